"""When two faces are the same person: one cosine threshold per recognizer, used by
`ipro prepare` (people of a clip), the face reward (people of a pool built on the fly),
the learned reward (people of the subject images) and `ipro eval` (swaps, lost faces).

dlib ResNet (the default; its cosine scale is narrow, see OFFLINE notes), measured on the
footage that ships in packages:
- same person: carphone (faces 49 and 28 px wide), face pairs >= 0.92 and a face vs its
  person's centroid >= 0.95; first vs second half of the clip, mean-pooled, 0.99;
- different people: 0.82-0.89 (the astronaut down to 22 px vs carphone: 0.816 at full
  size), and up to 0.91 only for 25 px LFW faces upscaled 4x (skimage's lfw_subset).
0.90 lies between the two bands. dlib's own rule (L2 < 0.6, i.e. cos > 0.82) would merge
different people on this recognizer.
ArcFace / CurricularFace: the usual verification threshold 0.3 (same person ~0.5 and up,
unrelated ~0).
"""

from __future__ import annotations

from ipro.errors import IproError

SAME_PERSON = {"dlib": 0.90, "arcface": 0.30, "curricularface": 0.30}


def same_person_threshold(recognizer: str) -> float:
    """The threshold of a recognizer by name (`FaceRecognizer.name`, or a spec like 'arcface:PATH')."""
    name = recognizer.lower()
    for prefix, threshold in SAME_PERSON.items():
        if name.startswith(prefix):
            return threshold
    raise IproError(
        f"recognizer '{recognizer}': no identity threshold (same-person cosine) is known for it; pass "
        f"identity_threshold= explicitly (known recognizers: {', '.join(SAME_PERSON)})"
    )
