"""The one exception type users see: the CLI prints its message on one line and exits 1."""


class VermouthError(Exception):
    """Bad input or state that the user can fix; the message names the culprit."""


class ImageError(VermouthError):
    """An image that cannot be decoded; carries the sample id so it can be recorded per sample."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"image {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason
