"""Model zoo: CIFAR ResNets (plain and pre-activation), DenseNet-BC, VGG with BN for 32x32, torchvision models.

    >>> from pyeff.models import create_model, list_models
    >>> model = create_model("resnet38", num_classes=10)
    >>> model = create_model("torchvision.resnet18", num_classes=100, in_channels=1)
"""
from pyeff.models.registry import create_model, is_model, list_models, register_model
from pyeff.models.cifar_resnet import BasicBlock, CifarResNet, ClassifierHead, PreActBlock, RESNET_DEPTHS  # registers
from pyeff.models.vgg import CifarVGG, VGG_CFGS  # registers
from pyeff.models.densenet import CifarDenseNet, DenseLayer  # registers

__all__ = ["create_model", "list_models", "register_model", "is_model", "BasicBlock", "PreActBlock", "CifarResNet",
           "ClassifierHead", "CifarVGG", "VGG_CFGS", "RESNET_DEPTHS", "CifarDenseNet", "DenseLayer"]
