"""The one exception type lstmlab raises for a user's mistake; the CLI prints it as one line."""


class LstmlabError(Exception):
    """A problem with the user's input (data, checkpoint, flags) with a message saying what to do."""
