class PipelineError(Exception):
    """A problem the user can fix. The message says what went wrong and what to do;
    the CLI prints it as one line, without a traceback."""
