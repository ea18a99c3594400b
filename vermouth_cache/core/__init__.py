"""What every stage shares and nothing else: the user-facing error, hashes and recipe keys,
atomic local writes, and the package logger with its progress bars. Imports no other package."""
