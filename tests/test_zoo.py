"""Model zoo: names, weights resolution, checkpoints and their failure modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models import ResNet18_Weights

from o2b_testing import shipped_photo
from object2brain.errors import ModelError, WeightsUnavailableError
from object2brain.models.zoo import (
    build_architecture,
    list_models,
    load_model,
    preprocessing_for,
    state_dict_sha256,
)


def cache_stand_in(
    weights: Any, source: torch.nn.Module, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Put ``source``'s state dict where torchvision caches ``weights`` (``$TORCH_HOME``) and
    make the enum read it from there: real weights, offline, without a download."""
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = Path(weights.url).name
    torch.save(source.state_dict(), cache / name)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(
        weights.__class__,
        "get_state_dict",
        lambda self, *a, **k: torch.load(cache / name, weights_only=True),
    )


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="did you mean resnet18"):
        load_model("resnet-18", "none")


def test_none_weights_are_seeded() -> None:
    a = load_model("resnet18", "none", seed=1)
    b = load_model("resnet18", "none", seed=1)
    c = load_model("resnet18", "none", seed=2)
    assert a.weights == "none"
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert not a.module.training
    assert not any(p.requires_grad for p in a.module.parameters())


def test_default_weights_unavailable_offline_say_how_to_provide_them() -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18", "default")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert "TORCH_HOME" in message and "--weights PATH" in message


def test_unknown_enum_name() -> None:
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET9K")


def test_default_weights_from_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in $TORCH_HOME/hub/checkpoints is used offline (a stand-in with random values)."""
    source = build_architecture("resnet18", seed=5)
    cache_stand_in(ResNet18_Weights.IMAGENET1K_V1, source, tmp_path, monkeypatch)
    loaded = load_model("resnet18", "IMAGENET1K_V1")
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert state_dict_sha256(loaded.module) == state_dict_sha256(source)
    assert len(loaded.weights_sha256) == 64


def test_checkpoint_plain_and_wrapped_with_module_prefix(tmp_path: Path) -> None:
    source = build_architecture("alexnet", seed=3)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth.tar"
    torch.save(source.state_dict(), plain)
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
        wrapped,
    )
    for path in (plain, wrapped):
        loaded = load_model("alexnet", str(path))
        assert state_dict_sha256(loaded.module) == state_dict_sha256(source)
        assert loaded.weights == str(path.resolve())


def test_places365_head_is_rebuilt(tmp_path: Path) -> None:
    source = build_architecture("resnet18", num_classes=365, seed=0)
    path = tmp_path / "resnet18_places365.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = load_model("resnet18", str(path))
    assert loaded.module.fc.out_features == 365
    out = loaded.module(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 365)


def test_old_style_densenet_keys(tmp_path: Path) -> None:
    source = build_architecture("densenet161", num_classes=365, seed=0)
    old = {}
    for key, value in source.state_dict().items():
        for part in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        old[f"module.{key}"] = value
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet161_places365.pth.tar"
    torch.save({"state_dict": old}, path)
    loaded = load_model("densenet161", str(path))
    assert state_dict_sha256(loaded.module) == state_dict_sha256(source)


def test_checkpoint_for_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(build_architecture("resnet18").state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_model("alexnet", str(path))
    assert "does not match architecture alexnet" in str(info.value)
    assert "missing keys" in str(info.value)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot be read as a torch checkpoint"):
        load_model("resnet18", str(path))


def test_list_models_reports_status() -> None:
    rows = {row.name: row for row in list_models()}
    assert rows["efficientnet_lite0"].status.startswith("bundled")
    assert "offline" in rows["vgg16"].status


def test_bundled_efficientnet_lite0_recognises_espresso() -> None:
    """A real check that the real weights and preprocessing load: coffee() is espresso-like."""
    model = load_model("efficientnet_lite0")
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    x = model.preprocessing.transform()(shipped_photo("coffee"))[None]
    with torch.no_grad():
        probabilities = model.module(x).softmax(dim=1)[0]
    top = categories[int(probabilities.argmax())]
    assert top in {"espresso", "cup", "coffee mug", "eggnog"}
    assert top == "espresso" and float(probabilities.max()) > 0.5
    chelsea = model.preprocessing.transform()(shipped_photo("chelsea"))[None]
    with torch.no_grad():
        cat_top3 = model.module(chelsea).topk(3).indices[0].tolist()
    assert {categories[i] for i in cat_top3} & {"tabby", "tiger cat", "Egyptian cat"}


def test_preprocessing_follows_the_chosen_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each torchvision weight set has its own transforms: resnet50 V1 resizes to 256 (V2, the
    default, to 232); vgg16's FEATURES weights take 0..255 pixel values (std 1/255)."""
    from torchvision.models import ResNet50_Weights, VGG16_Weights

    for arch, weights in (("resnet50", ResNet50_Weights), ("vgg16", VGG16_Weights)):
        for member in weights:
            expected = member.transforms()
            got = preprocessing_for(arch, member.name)
            assert got.resize_size == expected.resize_size[0]
            assert got.crop_size == expected.crop_size[0]
            np.testing.assert_allclose(got.std, expected.std)
    assert preprocessing_for("resnet50").resize_size == 232  # DEFAULT is IMAGENET1K_V2
    source = build_architecture("resnet50", seed=1)
    cache_stand_in(ResNet50_Weights.IMAGENET1K_V1, source, tmp_path, monkeypatch)
    assert load_model("resnet50", "IMAGENET1K_V1").preprocessing.resize_size == 256


def test_googlenet_checkpoint_computes_what_torchvision_pretrained_computes(
    tmp_path: Path,
) -> None:
    """torchvision's pretrained googlenet re-maps its input (transform_input=True): the same
    weights from a file must do so too."""
    from torchvision.models import googlenet

    torch.manual_seed(0)
    reference = googlenet(weights=None, aux_logits=True, init_weights=True).eval()
    path = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), path)  # torchvision's file layout, aux classifiers too
    reference.transform_input = True  # what googlenet(weights=...) sets
    reference.aux_logits, reference.aux1, reference.aux2 = False, None, None
    loaded = load_model("googlenet", str(path))
    x = torch.randn(2, 3, 224, 224)
    first: list[torch.Tensor] = []  # conv1's output: random-weight logits barely vary
    for network in (loaded.module, reference):
        handle = network.conv1.register_forward_hook(lambda m, i, o: first.append(o))
        with torch.no_grad():
            network(x)
        handle.remove()
    torch.testing.assert_close(first[0], first[1])


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_pixels_then_normalize_is_the_reference_transform_bit_for_bit(name: str) -> None:
    """Loader workers hand over uint8 pixels and the device normalises them: the model input must
    be exactly torchvision's one-step pipeline (written out here), batched or not."""
    from torchvision.transforms import InterpolationMode, v2

    prep = preprocessing_for(name)
    reference = v2.Compose(
        [
            v2.Resize(prep.resize_size, InterpolationMode(prep.interpolation), antialias=True),
            v2.CenterCrop(prep.crop_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(prep.mean), list(prep.std)),
        ]
    )
    photos = [shipped_photo(p) for p in ("astronaut", "coffee", "chelsea", "camera")]
    pixels = torch.stack([prep.pixels()(photo) for photo in photos])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, prep.crop_size, prep.crop_size)
    expected = torch.stack([reference(photo) for photo in photos])
    assert torch.equal(prep.normalize(pixels), expected)
    assert torch.equal(prep.transform()(photos[0]), expected[0])


def test_transforms_and_datasets_pickle_for_spawned_loader_workers(tmp_path: Path) -> None:
    """DataLoader workers started by spawn/forkserver (macOS, Windows, Python >= 3.14) receive the
    dataset pickled: its transform must not be a closure."""
    import pickle

    from object2brain.models.inputs import EncodedImageDataset, ImageDataset

    prep = preprocessing_for("resnet18")
    path = tmp_path / "coffee.jpg"
    shipped_photo("coffee").save(path)
    for dataset in (
        ImageDataset([path], ["a"], prep),
        ImageDataset([path], ["a"], prep, pixels=True),
        ImageDataset([path], ["a"], prep, augment=True),
        EncodedImageDataset([path], ["a"], prep),
    ):
        copy = pickle.loads(pickle.dumps(dataset))
        torch.manual_seed(0)  # the augmenting one draws its crop and flip from torch's RNG
        expected = dataset[0][1]
        torch.manual_seed(0)
        assert torch.equal(copy[0][1], expected)
