import json, os, pytest, torch, torchvision
from saliency_lab import core, data, models


def test_normalized_wraps_and_normalises():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    m = models.Normalized(net).eval()
    x = torch.rand(5, 3, 1, 1)
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1); std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), net((x - mean) / std))


def test_pretrained_path_loads_local_state_dict_through_torchvision_loader(tmp_path, monkeypatch):
    "pretrained=True goes through torchvision's weight loader, which reads $TORCH_HOME/hub/checkpoints first."
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None)
    w = torchvision.models.get_model_weights("resnet50")["IMAGENET1K_V1"]
    ckpt = tmp_path / "hub" / "checkpoints" / os.path.basename(w.url)
    ckpt.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = models.load_model("resnet50", pretrained=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.net.state_dict()[k], v), k
    assert not m.training and m.classes is not None and len(m.classes) == 1000
    assert models.default_layer(m) is m.net.layer4[2]
    x = torch.rand(1, 3, 64, 64)
    ref.eval()
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1); std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), ref((x - mean) / std))


def test_pretrained_as_state_dict_path(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.vgg16_bn(weights=None)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    m = models.load_model("vgg16_bn", pretrained=tmp_path / "w.pth", normalize_input=False)
    assert torch.equal(m.net.features[0].weight, ref.features[0].weight)
    assert torch.equal(m.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(m.std, torch.ones(1, 3, 1, 1))
    assert models.default_layer(m) is m.net.features[42]


@pytest.mark.parametrize("name", list(models.TORCHVISION_MODELS))
def test_default_layers_exist(name):
    if name in ("vit_b_16", "inception_v3", "densenet161", "convnext_tiny"):
        pytest.importorskip("torchvision")
    m = models.load_model(name, pretrained=False)
    assert isinstance(models.default_layer(m), torch.nn.Module)


def test_unknown_model():
    with pytest.raises(ValueError, match="did you mean"):
        models.load_model("resnet_50")
    with pytest.raises(ValueError, match="unknown embedded model"):
        models.load_model("shapes/alexnet_s")


def test_missing_embedded_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCY_LAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train-embedded"):
        models.load_model("shapes/vgg_s")


MANIFEST = models.embedded_manifest()


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_embedded_models_reach_recorded_accuracy(name):
    rec = MANIFEST[name]
    m = models.load_model(name)
    x, y, _ = data.load_batch(data.load_dataset(rec["dataset"], split="test"))
    acc = models.accuracy(m, x, y)
    assert abs(acc - rec["test_acc"]) <= 0.005, (acc, rec["test_acc"])
    assert acc > 0.5


def test_every_embedded_model_is_committed():
    expected = set(models.embedded_models())
    assert "shapes/vit_s" in expected and "digits/vit_s" not in expected
    assert set(MANIFEST) == expected
    for name in expected:
        assert (core.data_dir() / "models" / (name.replace("/", "_") + ".pt")).exists()


def test_training_is_deterministic(tmp_path):
    a = models.train_embedded("digits", "vgg_s", epochs=1, out_dir=tmp_path / "a", progress=False)
    b = models.train_embedded("digits", "vgg_s", epochs=1, out_dir=tmp_path / "b", progress=False)
    assert a["sha256"] == b["sha256"] and a["test_acc"] == b["test_acc"]
