"""Face identity scoring for real photos: MTCNN crops, FaceNet (Inception-ResNet-v1, VGGFace2) embeddings.

The mini world scores identities with its own encoder (:mod:`w2wlib.world.encoder`); on SD 1.5 the images
are photographs, and the ID score is the one w2w++'s baseline reported (0.557 over 100 FFHQ images):
facenet-pytorch's ``InceptionResnetV1(pretrained="vggface2")`` on its ``MTCNN`` crops, cosine similarity.
facenet-pytorch itself pins ``torch < 2.3``, so the networks are written here (same layer names, so its
published weights load unchanged) and the weights download on first use:

* :mod:`~w2wlib.facenet.inception`: the embedding network;
* :mod:`~w2wlib.facenet.mtcnn`: the three-stage face detector;
* :mod:`~w2wlib.facenet.weights`: where the weights come from and are cached;
* :mod:`~w2wlib.facenet.scorer`: :class:`FaceScorer`, the identity-encoder interface, and
  :func:`load_face_scorer`.

Example:
    >>> from w2wlib.facenet import load_face_scorer
    >>> scorer = load_face_scorer("cuda")                                    # doctest: +SKIP
    >>> z = scorer.embed(photos)               # uint8 [N, H, W, 3] -> [N, 512]  # doctest: +SKIP
"""

from .inception import InceptionResnetV1
from .mtcnn import MTCNN
from .scorer import FaceScorer, crop_face, load_face_scorer, standardise
from .weights import default_cache_dir

__all__ = ["FaceScorer", "load_face_scorer", "InceptionResnetV1", "MTCNN", "crop_face", "standardise",
           "default_cache_dir"]
