"""CustomDiffError: the one exception for problems a user can fix (bad input, missing files)."""


class CustomDiffError(Exception):
    """A problem the user can fix; its message is one line naming the file or flag and the fix."""
