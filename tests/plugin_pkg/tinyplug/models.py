from fusionkd.models.resnet import cifar_resnet


def tiny_resnet8(num_classes=10, in_chans=3):
    """A CIFAR ResNet-8 with stage widths 8/16/32 (example plug-in model)."""
    return cifar_resnet(8, (8, 8, 16, 32), num_classes, in_chans)
