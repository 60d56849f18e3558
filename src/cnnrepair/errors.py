"""The one exception type users see: a one-line message naming the problem and the fix."""


class CnnRepairError(Exception):
    """Bad input or an unusable file; the CLI prints the message alone and exits with code 2."""
