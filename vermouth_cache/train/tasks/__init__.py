"""The tasks a head is trained for, one module each."""
