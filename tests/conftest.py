import pytest, torch, torchvision
from saliency_lab import data, models


@pytest.fixture(scope="session")
def shapes_batch():
    x, y, metas = data.load_batch(data.load_dataset("shapes", n=12))
    return x, y, metas


@pytest.fixture(scope="session")
def embedded():
    return {n: models.load_model(n) for n in ("shapes/resnet_s", "shapes/vgg_s")}


def random_torchvision(name, num_classes=10, seed=0):
    "A torchvision model with random weights and randomised BN statistics, wrapped and in eval mode."
    torch.manual_seed(seed)
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
    return models.Normalized(net, name=name).eval()


@pytest.fixture(scope="session")
def resnet18():
    return random_torchvision("resnet18")


@pytest.fixture(scope="session")
def vgg11_bn():
    return random_torchvision("vgg11_bn")
