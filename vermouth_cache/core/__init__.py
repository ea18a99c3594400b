"""What every stage shares and nothing else: the user-facing error, hashes and recipe keys,
atomic local writes, the optional extras, and the package logger with its progress bars. Imports
no other package."""
