"""The synthetic P-VLG benchmark generator: `draw` paints pedestrians, `text` writes their captions,
`generate` assembles a `pvlg`-format dataset with exact region ground truth, `__main__` is its CLI."""

from storage.synth.generate import ANNOTATION_FILE, SYNTH_VERSION, generate

__all__ = ["ANNOTATION_FILE", "SYNTH_VERSION", "generate"]
