"""The reference of the training benchmark: the study's pipeline as a newcomer would write it.

Deliberately plain and not slowed down in any way: PIL decoding of the original JPEGs on every
access, torchvision v1 transforms, three forwards, fp32, ``nn.TripletMarginLoss``, Adam and a
default DataLoader with two workers. ``scripts/benchmark_train.py`` times it beside the suite.
"""
import random

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from triplet.bench.speed import step_speed
from triplet.bench.timing import memory_report, timed_batches
from triplet.model import build_model


class PlainTripletDataset(Dataset):
    """Anchor i, a random other image of its class and a random image of another class."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform
        self.by_class = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(i)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))

    def __getitem__(self, i):
        label = self.labels[i]
        positive = random.choice([j for j in self.by_class[label] if j != i])
        negative = random.choice(self.by_class[random.choice([c for c in self.by_class if c != label])])
        return self.load(i), self.load(positive), self.load(negative)


def reference_train(device, backbone, paths, labels, image_size, batch_size, warmup, steps):
    """The straightforward implementation a newcomer would write, timed as it is.

    It is an honest baseline, not a slowed-down one: the usual PIL + transforms v1 pipeline on
    the original JPEGs, two loader workers, the same model, optimiser and margin as the suite.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    transform = T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(PlainTripletDataset(paths, labels, transform), batch_size=batch_size,
                        shuffle=True, num_workers=2)
    model = build_model(backbone, image_size=image_size).to(device)
    criterion = nn.TripletMarginLoss(margin=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    seconds, running_loss = [], 0.0
    for anchor, positive, negative in timed_batches(loader, warmup, steps, device, seconds):
        anchor, positive, negative = anchor.to(device), positive.to(device), negative.to(device)
        loss = criterion(model(anchor), model(positive), model(negative))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return {"data": "original JPEGs, PIL + transforms v1", "precision": "fp32", "memory_format": "contiguous",
            "workers": 2, "threads": torch.get_num_threads(), **step_speed(seconds[0], steps, batch_size), **memory_report(device)}
