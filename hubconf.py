"""torch.hub entry points (https://pytorch.org/docs/stable/hub.html):

    model = torch.hub.load("<this checkout>", "alexnet", source="local")                 # the paper's net
    model = torch.hub.load("<this checkout>", "alexnet", source="local", towers=1)       # any AlexNetConfig field
    model = torch.hub.load("<this checkout>", "alexnet", source="local", weights="runs/x/checkpoint.pt")
    model = torch.hub.load("<this checkout>", "alexnet_caffe", "bvlc_alexnet.caffemodel", source="local")

No weights are shipped. The pretrained net is Caffe's bvlc_alexnet: download
http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel (sha1 9116a64c0fbe4459d18f4bb6b56d647b63920377,
BVLC/caffe models/bvlc_alexnet/readme.md) and load it with alexnet_caffe. torchvision's habits,
weights="DEFAULT", weights=AlexNet_Weights.DEFAULT and pretrained=True, raise a ValueError saying so.

A model loaded with weights is in eval mode and carries `model.weights`, its record: class
names, mean image, metrics, recipe, licence and `transforms()` (reproduction/weights.py).
"""

dependencies = ["torch", "torchvision", "numpy", "PIL"]

from reproduction.weights import alexnet as _alexnet, alexnet_caffe as _alexnet_caffe  # noqa: E402


def alexnet(weights=None, **config):
    """AlexNet (Krizhevsky et al. 2012) with the paper's config, any AlexNetConfig field changed
    by keyword; `weights`: a checkpoint of this project (trained, or written by reproduction.caffe)."""
    return _alexnet(weights, **config)


def alexnet_caffe(path=None, **kwargs):
    """Caffe's bvlc_alexnet from bvlc_alexnet.caffemodel (http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel,
    sha1 9116a64c0fbe4459d18f4bb6b56d647b63920377) or the TensorFlow ports' bvlc_alexnet.npy; `mean=`
    Caffe's ilsvrc_2012_mean.npy (default: its per-channel mean), `prototxt=` deploy.prototxt to check
    against; needs protobuf."""
    return _alexnet_caffe(path, **kwargs)
