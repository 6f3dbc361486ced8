"""
The classifier behind FID-LeNet: a LeNet-style CNN trained once on a dataset's training split and cached, whose
128-d penultimate features stand in for Inception's on 28 x 28 images (evaluate.py).

It trains in 5 epochs with seed 0 on the CPU and is cached at ~/.cache/purrception/classifier-{dataset}.pt
($XDG_CACHE_HOME is honoured). The seed fixes the network up to the last digits of floating point, which vary
with the CPU and its thread count: the cached file, not the seed, defines the metric. The file records the MD5s
of the images it was trained and tested on, and refuses to score other data; an unreadable file or one of
another dataset is an error, never silently replaced: delete it to retrain.
"""

import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from support import datasets, files
from support.datasets import CLASS_NAMES, read_mnist
from support.images import to_float

CLASSIFIER_FORMAT = "purrception-classifier/1"


# ---- The classifier: LeNet-style, its penultimate layer gives the features of FID-LeNet ------------------

class LeNet(nn.Module):
    """Two 3x3 conv blocks and two linear layers; `features` is the 128-d penultimate layer after its ReLU."""

    def __init__(self, num_classes=10, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
        )
        self.fc = nn.Linear(64 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)  # CPU convolutions run about 1.6x faster channels-last

    def features(self, x):  # x: (B, 1, 28, 28) in [-1, 1]
        x = x.contiguous(memory_format=torch.channels_last)
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))  # (B, num_classes)


@torch.no_grad()
def extract(model, images, batch_size=1000, desc="features"):
    """Penultimate features (N, 128) float64 and predicted classes (N,) int64 of uint8 images."""
    model.eval()
    features, predictions = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        f = model.features(to_float(images[i:i + batch_size]))  # (B, 128)
        features.append(f.double().numpy())
        predictions.append(model.head(f).argmax(1).numpy())
    if not features:
        return np.zeros((0, model.fc.out_features)), np.zeros(0, dtype=np.int64)
    return np.concatenate(features), np.concatenate(predictions)


def train_classifier(dataset, data_dir, epochs=5, batch_size=128, lr=2e-3, seed=0, limit=None):
    """Train a LeNet on the training split (its first `limit` images if given) with Adam and a one-cycle
    learning rate. Returns (model in eval mode, info): info holds test_accuracy (on the whole test split),
    train_images, epochs, seed and seconds. The caller's random state is left untouched."""
    start = time.time()
    images, labels, train_data = read_mnist(dataset, data_dir, "train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet(len(CLASS_NAMES[dataset]))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
        model.train()
        progress = tqdm(total=epochs * steps_per_epoch, desc=f"training the {dataset} classifier")
        for epoch in range(epochs):
            order = torch.randperm(len(images)).numpy()
            for i in range(steps_per_epoch):
                batch = order[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(to_float(images[batch])), torch.from_numpy(labels[batch]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        progress.close()
    model.eval()
    test_images, test_labels, test_data = read_mnist(dataset, data_dir, "test")
    _, predictions = extract(model, test_images, desc="classifier test accuracy")
    info = dict(test_accuracy=float(np.mean(predictions == test_labels)), train_images=len(images),
                epochs=epochs, seed=seed, seconds=round(time.time() - start, 1),
                data=dict(dataset=dataset, train_images_md5=train_data["images_md5"],
                          test_images_md5=test_data["images_md5"]))
    return model, info


# ---- The classifier cache --------------------------------------------------------------------------------

def default_classifier_path(dataset):
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "purrception", f"classifier-{dataset}.pt")


def load_classifier(dataset, data_dir, path=None, test_split=None, **train_kwargs):
    """(model, info) from the cache file at `path` (default: default_classifier_path(dataset)); when the file
    does not exist, train the classifier (train_kwargs go to train_classifier) and write it there first.

    info: path, dataset, test_accuracy, train_images, epochs, seed, seconds (of training) and data (the dataset and
    the MD5s of the images files it was trained and tested on). A file that is not a classifier of `dataset`, or
    was trained on other data than the files in data_dir, is a ValueError naming it, never silently replaced.
    test_split: read_mnist(dataset, data_dir, "test"), when the caller has read it already."""
    path = path or default_classifier_path(dataset)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a directory; expected a classifier file of evaluate.py, or the name of "
                                f"one to write")
    if not os.path.exists(path):
        model, info = train_classifier(dataset, data_dir, **train_kwargs)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.save_torch(path, dict(format=CLASSIFIER_FORMAT, dataset=dataset, **info, model=model.state_dict()))
        print(f"classifier: test accuracy {info['test_accuracy']:.2%} after {info['seconds']:.0f} s -> {path}",
              file=sys.stderr)
    fix = "delete it to train a new one, or pass another --classifier"
    record = files.load_torch(path, f"a classifier file of evaluate.py (format {CLASSIFIER_FORMAT}); {fix}")
    if not isinstance(record, dict) or record.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a classifier file of evaluate.py (format {CLASSIFIER_FORMAT}); {fix}")
    if record.get("dataset") != dataset:
        raise ValueError(f"{path}: a classifier of {record.get('dataset')}, not of {dataset}; {fix}")
    model = LeNet(len(CLASS_NAMES[dataset]))
    weights = record.get("model")
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in weights.items()} \
        if isinstance(weights, dict) else None
    if found != wanted:
        raise ValueError(f"{path}: its weights do not fit the classifier of evaluate.py; {fix}")
    model.load_state_dict(weights)
    model.eval()
    identity = (test_split or read_mnist(dataset, data_dir, "test"))[2]
    check_classifier_data(path, record, data_dir, identity, fix)
    info = {k: v for k, v in record.items() if k not in ("format", "model")}
    return model, dict(path=os.path.abspath(path), **info)


def check_classifier_data(path, record, data_dir, identity, fix):
    """ValueError naming `path` unless the classifier was trained on the data in data_dir: the MD5 of the test
    images it recorded must be that of data_dir's."""
    data = record.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no record of the data it was trained on; {fix}")
    if data.get("test_images_md5") == identity["images_md5"]:
        return
    titles = datasets.DATASET_TITLES
    trained = datasets.known_dataset(str(data.get("train_images_md5")))
    here = datasets.known_dataset(identity["images_md5"])
    if trained and here and trained != here:  # "trained on Fashion-MNIST's images, not MNIST's"
        raise ValueError(f"{path} was trained on {titles[trained]}'s images, not {titles[here]}'s; {fix}")
    raise ValueError(f"{path} was trained on other images than those in {data_dir} (test images MD5 "
                     f"{data.get('test_images_md5')}, not {identity['images_md5']}); {fix}")
