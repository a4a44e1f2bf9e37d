"""The miniature world: scenes and prompts, the world CLIP, the GenEval-mini judge.

The built models ship in ``assets/`` (``rlhf world build`` makes them; ``manifest.json``
holds each file's size and sha256 and the command that made them).
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CLIP_DIR = ASSETS / "clip"
JUDGE_DIR = ASSETS / "judge"
SD3_DIR = ASSETS / "sd3"
# The world CLIP's image towers (``rlhf world build --clip-vision``).
VISION_TOWERS = ("vit", "resnet")
