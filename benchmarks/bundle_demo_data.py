"""Bundle the demo's data into the package: the first 1,000 Fashion-MNIST test images and their labels.

Run:  python -m benchmarks.bundle_demo_data

Writes exfx/data/fashion_mnist_test_1000.npz (uint8 images, int64 labels) and the
data set's MIT licence notice, exfx/data/FASHION_MNIST_LICENSE. The demo CNN itself
is bundled by `python -m benchmarks.train_cv --model small_cnn`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.data import load_fashion_mnist

DATA = Path(__file__).parent.parent / "exfx" / "data"
COUNT = 1_000

LICENSE = """Fashion-MNIST (the 1,000 images in fashion_mnist_test_1000.npz are its first 1,000 test images)
Copyright (c) 2017 Zalando SE, https://tech.zalando.com
Taken from Debian's dataset-fashion-mnist package.

The MIT License (MIT)

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN
NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY,
WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def main() -> None:
    images, labels = load_fashion_mnist().test
    DATA.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DATA / "fashion_mnist_test_1000.npz", images=images[:COUNT].numpy(),
                        labels=labels[:COUNT].numpy())
    (DATA / "FASHION_MNIST_LICENSE").write_text(LICENSE)
    print(f"wrote {COUNT} images to {DATA}")


if __name__ == "__main__":
    main()
