"""Errors the command-line tools turn into one-line messages.

Every failure a user can cause or fix (bad input, bad files, missing rights) raises a
subclass of PcapVaultError whose text is the whole message: it says what is wrong and what to
do. The CLIs print it on one line and exit non-zero, never with a traceback.
"""


class PcapVaultError(Exception):
    """A failure with a message fit for the user."""


class FormatError(PcapVaultError):
    """A file is not in a format (or version) this release understands, or is damaged."""


class DumpSetError(PcapVaultError):
    """A path is not a usable dump set or timeline."""
