"""The project's errors. Each message is one line that names the file or flag; the scripts print it and exit
with status 2 (cli.run_cli). Each is also the standard type a Python caller catches: ValueError for values,
shapes and files whose content cannot be used, OSError for files that cannot be read or written,
FileNotFoundError for paths that do not exist."""

# Control characters (a newline in a file name, say) shown as escapes, so a message naming any file stays one line.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """text with its control characters escaped (a file may be named "a\\nb.png"): one line however it was built."""
    return text.translate(_ESCAPES)


class UserError(Exception):
    """A mistake in flags, paths or files: reported as one line on stderr with exit status 2. The message is one
    line whatever the names in it hold (one_line)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class WriteError(UserError, OSError):
    """A file could not be written (disk full, read-only, no permission); the message names it and the cause."""


class DataError(UserError, ValueError):
    """Data that cannot be used as it is; the message names the file or folder."""


class BadSampleError(DataError):
    """One image or mask that cannot be used; the message names the file."""


class ChannelMismatch(BadSampleError):
    """An image whose channel count the model cannot take as it is."""


class UnreadableFile(BadSampleError, OSError):
    """An image or mask file that cannot be decoded (broken, truncated, not an image, no permission)."""


class MissingFile(UnreadableFile, FileNotFoundError):
    """An image or mask path that does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class OnnxError(UserError, ValueError):
    """An ONNX file that cannot be used; the message names the file."""


class MissingOnnx(OnnxError, FileNotFoundError):
    """An ONNX path that does not exist."""


class CocoError(UserError, ValueError):
    """A COCO annotation file that cannot be used; the message names it and the entry."""
