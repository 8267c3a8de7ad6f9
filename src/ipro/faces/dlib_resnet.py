"""dlib's face-recognition ResNet, read straight from its `.dat` file and run in PyTorch.

dlib's `dlib_face_recognition_resnet_model_v1.dat` (CC0) maps a 150x150 RGB face chip
to a 128-d descriptor; two chips of the same person are usually < 0.6 apart (L2). We
parse dlib's serialization ourselves (dlib is not needed), build the graph from the
layer sequence found in the file, and run it with ordinary torch ops, so it is
differentiable, batched, and runs on CPU or CUDA in any float dtype.

The file format (dlib/serialize.h, dlib/dnn/core.h, layers.h):

- integer: one header byte (low nibble = number of little-endian value bytes that
  follow, high bit = negative), then the bytes. float: two integers m, e = m * 2**e.
  string: integer length, then bytes. bool: the character '0' or '1'.
- tensor: version 2, dims (num, k, nr, nc), then float32 little-endian data.
- the net is nested types, `loss<layer<layer<...<input>>>>`. Each wrapper writes its
  version and then its inner net *before* its own details, so the file holds the
  loss, then one version integer per wrapper from the output inwards (2 = layer,
  1 = tag or skip, 3 = the layer right above the input), then the input layer, then
  each layer's details from the input outwards. Tags and skips write nothing but that
  version 1: dlib does not store their ids (see `_wire` for how we rebuild them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError
from ipro.faces.align import DLIB_TEMPLATE_150
from ipro.faces.recognizer import FaceRecognizer
from ipro.faces.weights import dlib_recognition_weights


class _Truncated(Exception):
    pass


class _Reader:
    """Sequential reader for dlib's serialization format."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        header = self._take(1)[0]
        if header & 0x70:  # bits dlib never sets: not an integer here
            raise ValueError(f"bad integer header byte {header:#x} at offset {self.pos - 1}")
        if (header & 0x0F) > 8:
            raise ValueError(f"bad integer size {header & 0x0F} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(header & 0x0F), "little")
        return -value if header & 0x80 else value

    def peek_int(self) -> int:
        pos = self.pos
        try:
            return self.int()
        finally:
            self.pos = pos

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return mantissa * 2.0**exponent

    def skip_floats(self, n: int) -> None:
        for _ in range(n):
            self.float()

    def str(self) -> str:
        return self._take(self.int()).decode("latin-1")

    def bool(self) -> bool:
        c = self._take(1)
        if c not in (b"0", b"1"):
            raise ValueError(f"bad bool {c!r} at offset {self.pos - 1}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        if (version := self.int()) != 2:
            raise ValueError(f"tensor version {version}, expected 2")
        dims = [self.int() for _ in range(4)]
        if min(dims) < 0:
            raise ValueError(f"negative tensor dims {dims}")
        n = dims[0] * dims[1] * dims[2] * dims[3]
        return np.frombuffer(self._take(4 * n), "<f4").reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        """An alias_tensor: the shape of a view into the layer's `params`."""
        if (version := self.int()) != 1:
            raise ValueError(f"alias_tensor version {version}, expected 1")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]


def _read_layer(r: _Reader) -> dict:
    """One layer's details, keyed by dlib's serialization tag."""
    name = r.str()
    if name == "con_4":
        params = r.tensor().reshape(-1)
        n, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
        w_shape, b_shape = r.alias(), r.alias()
        r.skip_floats(4)  # learning-rate / weight-decay multipliers (training only)
        if (w_shape[0], w_shape[2], w_shape[3]) != (n, nr, nc):
            raise ValueError(f"con_4 filter shape {w_shape} disagrees with {n} filters of {nr}x{nc}")
        nw = int(np.prod(w_shape))
        weight = params[:nw].reshape(w_shape)  # (filters, k, nr, nc), cross-correlation
        bias = params[nw : nw + int(np.prod(b_shape))].reshape(-1) if b_shape[1] else None
        return dict(kind="con", weight=weight, bias=bias, stride=(sy, sx), padding=(py, px))
    if name == "affine_":
        params = r.tensor().reshape(-1)
        g_shape, b_shape = r.alias(), r.alias()
        mode = r.int()  # 0 = per channel (CONV_MODE), 1 = per element (FC_MODE)
        ng = int(np.prod(g_shape))
        gamma, beta = params[:ng].reshape(g_shape), params[ng : ng + int(np.prod(b_shape))].reshape(b_shape)
        return dict(kind="affine", gamma=gamma, beta=beta, per_channel=mode == 0)
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return dict(kind=name[:3] + "_pool", window=(nr, nc), stride=(sy, sx), padding=(py, px))
    if name == "fc_2":
        n_out, n_in = r.int(), r.int()
        params = r.tensor().reshape(-1)
        r.alias(), r.alias()
        no_bias = r.int() == 1  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
        r.skip_floats(4)
        rows = n_in + (0 if no_bias else 1)  # params are (inputs [+ bias row]) x outputs
        table = params[: rows * n_out].reshape(rows, n_out)
        return dict(kind="fc", weight=table[:n_in].T, bias=None if no_bias else table[n_in])
    if name == "relu_":
        return dict(kind="relu")
    if name == "add_prev_":
        return dict(kind="add_prev")
    if name == "input_rgb_image_sized":
        mean = [r.float() for _ in range(3)]
        nr, nc = r.int(), r.int()
        return dict(kind="input", mean=mean, size=(nr, nc))
    raise ValueError(f"unsupported dlib layer '{name}'")


def parse_dlib_net(data: bytes) -> list[dict]:
    """The layers of a serialized `loss_metric` net, in execution order (input first).

    Tags and skips come back as dicts of kind "tag"/"skip" (see `_wire`).
    """
    r = _Reader(data)
    if (version := r.int()) != 1:
        raise ValueError(f"loss-layer version {version}, expected 1")
    loss = r.str()
    if loss != "loss_metric_2":
        raise ValueError(f"loss layer '{loss}', expected 'loss_metric_2' (a metric-learning net)")
    r.float(), r.float()  # margin, distance threshold (0.04, 0.6): training-only
    # One version per wrapper, output first, until the input layer's name string.
    versions = []
    while r.peek_int() in (1, 2, 3):
        versions.append(r.int())
        if versions[-1] == 3:  # add_layer<LAYER, INPUT>: the input comes next
            break
    if not versions or versions[-1] != 3:
        raise ValueError("no input layer found under the layer stack")
    layers = [_read_layer(r)]
    if layers[0]["kind"] != "input":
        raise ValueError(f"expected an input layer, found '{layers[0]['kind']}'")
    for version in reversed(versions):
        if version == 1:  # tag or skip: no details in the file
            layers.append(dict(kind="marker"))
            continue
        layers.append(_read_layer(r))
        # add_layer bookkeeping: 3 flags, x_grad, cached_output, params_grad tensors
        for _ in range(3):
            r.bool()
        for _ in range(3):
            r.tensor()
        if version == 3:
            r.int()  # sample expansion factor
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} unread bytes after the last layer")
    return _wire(layers)


def _wire(layers: list[dict]) -> list[dict]:
    """Name the tag/skip markers and check the residual wiring is consistent.

    dlib stores neither the kind nor the id of a tag/skip. A skip right after the tag
    it refers to would be a no-op, so in a run of markers (execution order) the first
    is a tag and any that follow are skips back to the tag before it, e.g. dlib's
    `add_prev2<avg_pool<skip1<tag2<block<tag1<x>>>>>>` reads x, tag, block, tag,
    skip, avg_pool, add_prev. With a stack: tag pushes the current tensor, skip
    resumes from the tensor tagged before the last one, add_prev adds the last one.
    """
    out, depth = [], 0
    for i, layer in enumerate(layers):
        if layer["kind"] == "marker":
            is_skip = i > 0 and layers[i - 1]["kind"] == "marker"
            layer = dict(kind="skip" if is_skip else "tag")
        depth += {"tag": 1, "skip": -1, "add_prev": -1}.get(layer["kind"], 0)
        if depth < 0 or (layer["kind"] == "skip" and depth < 1):
            raise ValueError(f"layer {i} ({layer['kind']}) refers to a tag that does not exist")
        out.append(layer)
    if depth != 0:
        raise ValueError(f"{depth} tagged tensors are never used")
    return out


class _Tag(nn.Module):
    pass


class _Skip(nn.Module):
    pass


class _AddPrev(nn.Module):
    pass


class _Affine(nn.Module):
    """dlib's affine_ (inference-time batch norm) when no conv precedes it to fold into."""

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(gamma), nn.Parameter(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class _AvgPool(nn.Module):
    """dlib's avg_pool: window 0 means the whole image; padded cells are not counted."""

    def __init__(self, window, stride, padding) -> None:
        super().__init__()
        self.window, self.stride, self.padding = window, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window == (0, 0):
            return x.mean((2, 3), keepdim=True)
        return F.avg_pool2d(x, self.window, self.stride, self.padding, count_include_pad=False)

    def extra_repr(self) -> str:
        return f"window={self.window}, stride={self.stride}, padding={self.padding}"


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: tensors of different shapes add as if the smaller were
    zero-padded at the end of channels, rows and columns (tt::add)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(p, q) for p, q in zip(a.shape[1:], b.shape[1:]))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


def _f(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _build(layers: list[dict]) -> nn.ModuleList:
    """torch modules in execution order; an affine right after a conv is folded into it
    (dlib's affine is a frozen per-channel scale and shift, so this is exact up to rounding)."""
    mods: list[nn.Module] = []
    i = 1  # layers[0] is the input layer, handled in embed_chips
    while i < len(layers):
        layer = layers[i]
        kind = layer["kind"]
        if kind == "con":
            weight, bias = _f(layer["weight"]), layer["bias"]
            bias = _f(bias) if bias is not None else torch.zeros(weight.shape[0])
            nxt = layers[i + 1] if i + 1 < len(layers) else {}
            if nxt.get("kind") == "affine" and nxt["per_channel"]:
                gamma, beta = _f(nxt["gamma"]).reshape(-1), _f(nxt["beta"]).reshape(-1)
                weight, bias = weight * gamma[:, None, None, None], bias * gamma + beta
                i += 1
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), layer["stride"], layer["padding"])
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
            # channels_last runs ~25% faster on CPU (oneDNN's native layout) and suits cuDNN.
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
            mods.append(conv)
        elif kind == "affine":
            mods.append(_Affine(_f(layer["gamma"]), _f(layer["beta"])))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "max_pool":
            # torch pads max pooling with -inf, like dlib's clipped windows.
            mods.append(nn.MaxPool2d(layer["window"], layer["stride"], layer["padding"]))
        elif kind == "avg_pool":
            mods.append(_AvgPool(layer["window"], layer["stride"], layer["padding"]))
        elif kind == "fc":
            fc = nn.Linear(*layer["weight"].shape[::-1], bias=layer["bias"] is not None)
            fc.weight.data.copy_(_f(layer["weight"]))
            if layer["bias"] is not None:
                fc.bias.data.copy_(_f(layer["bias"]))
            mods.append(nn.Sequential(nn.Flatten(), fc))
        else:
            mods.append({"tag": _Tag, "skip": _Skip, "add_prev": _AddPrev}[kind]())
        i += 1
    return nn.ModuleList(mods)


class DlibResNet(FaceRecognizer):
    """dlib's 29-conv face ResNet: 150x150 RGB chips -> 128-d descriptors (norm ~1)."""

    name = "dlib-resnet"
    input_size = 150
    embedding_dim = 128

    def __init__(self, layers: list[dict]) -> None:
        super().__init__()
        self.template.copy_(DLIB_TEMPLATE_150)
        inp = layers[0]
        if inp["size"] != (self.input_size, self.input_size):
            raise ValueError(f"input size {inp['size']}, expected {self.input_size}")
        self.register_buffer("mean", torch.tensor(inp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.layers = _build(layers)

    @classmethod
    def from_file(cls, path: str | Path) -> DlibResNet:
        path = Path(path)
        hint = "use dlib_face_recognition_resnet_model_v1.dat from `pip install face-recognition-models==0.3.0`"
        if not path.is_file():
            raise IproError(f"dlib weights file {path} does not exist; {hint}")
        data = path.read_bytes()
        if data[:3] == b"BZh":
            raise IproError(f"dlib weights file {path} is bzip2-compressed; decompress it first (`bunzip2 {path}`)")
        try:
            model = cls(parse_dlib_net(data))
        except _Truncated:
            raise IproError(f"dlib weights file {path} is truncated or not a dlib network file; {hint}") from None
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            raise IproError(f"{path} is not a dlib face-recognition network ({e}); {hint}") from None
        dim = model.layers[-1][-1].out_features if isinstance(model.layers[-1], nn.Sequential) else None
        if dim != cls.embedding_dim:
            raise IproError(f"{path} does not end in a {cls.embedding_dim}-d fc layer; {hint}")
        return model

    @classmethod
    def from_package(cls) -> DlibResNet:
        return cls.from_file(dlib_recognition_weights())

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        x = chips.to(self.mean.dtype)
        x = (x * 255 - self.mean) / 256  # input_rgb_image_sized: (pixel - mean) / 256
        x = x.contiguous(memory_format=torch.channels_last)  # matches the conv weights
        stack: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, _Tag):
                stack.append(x)
            elif isinstance(layer, _Skip):
                x = stack.pop(-2)  # back to the tensor tagged before the latest tag
            elif isinstance(layer, _AddPrev):
                x = _add_padded(x, stack.pop())
            else:
                x = layer(x)
        return x
