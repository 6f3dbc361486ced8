"""
The tokenizer's commands: train the MNIST / Fashion-MNIST VQ tokenizer (vq.py), and encode a dataset into
a code set (support/codesets.py) for train.py with it or with a pretrained tokenizer (support/tokenizers.py).

    python tokenizer.py train --dataset fashion-mnist --data-dir DIR --out runs/fmnist-vq      # RUN/tokenizer.pt
    python tokenizer.py encode --tokenizer runs/fmnist-vq/tokenizer.pt --dataset fashion-mnist --data-dir DIR \\
        --split train --out runs/fmnist-codes                                          # a code set
    torchrun --nproc_per_node=8 tokenizer.py encode --tokenizer llamagen-vq8 --tokenizer-ckpt vq_ds8_c2i.pt \\
        --dataset imagefolder --data-dir /data/imagenet/train --image-size 256 --out CODES

`train` writes RUN/tokenizer.pt (tokenizers.mnist_checkpoint: kind, config, weights, metrics, args), RUN/recon.png (one
test image of each class above its reconstruction) and RUN/metrics.json (test MSE, PSNR, codebook usage and
perplexity). The same --seed gives the same weights, on the same machine and software. It refuses a RUN that
already holds a tokenizer.pt unless given --force: the code sets and flows made with that tokenizer decode only
through it. A loss that stops being a finite number stops the run at once, and nothing is written.

`encode` writes one view of every MNIST image, and two of every ImageFolder image (the center crop and its
horizontal flip), in shards; an ImageFolder encode is shared among torchrun's processes and resumes shard by
shard. meta.json, written last, records the tokenizer (tokenizers.record) so sample.py can decode the codes,
and, for MNIST and Fashion-MNIST, `data`: the dataset, the split and the MD5 of its decompressed images file (the
tokenizer's metrics hold the MD5s of both images files it was trained and tested on). Another dataset's files under
a --dataset name are refused (support/datasets.py).
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import vq
from support import codesets, config, datasets, distributed, files, images, tokenizers
from support.cli import (ArgumentParser, UserError, check_positive, check_seed, make_dir, refuse_overwrite, run_command,
                         user_errors)
from support.schedule import learning_rate

DATASETS = ("mnist", "fashion-mnist")


# ---- Training --------------------------------------------------------------------------------------------

def mnist_batches(pixels, labels, batch_size):
    """(images (B, 1, 28, 28) float in [-1, 1], labels (B,)) pairs over uint8 images (N, 28, 28), in order."""
    for lo in range(0, len(pixels), batch_size):
        yield images.to_float(pixels[lo:lo + batch_size]), labels[lo:lo + batch_size]


@torch.no_grad()
def reconstruction_metrics(tokenizer, pixels, batch_size=500):
    """Reconstruction MSE (in [-1, 1]) and PSNR, codebook usage and perplexity over uint8 images (N, 28, 28)."""
    squared_error, counts = 0.0, torch.zeros(tokenizer.codebook.shape[0], dtype=torch.long)
    for lo in range(0, len(pixels), batch_size):
        x = images.to_float(pixels[lo:lo + batch_size])  # (B, 1, 28, 28)
        codes = tokenizer.encode(x)  # (B, 7, 7)
        squared_error += (tokenizer.decode(codes) - x).pow(2).sum().item()
        counts += vq.code_counts(codes, len(counts))
    mse = squared_error / (len(pixels) * pixels[0].size)
    return {"mse": mse, "psnr": 10 * math.log10(4 / max(mse, 1e-12)),  # peak-to-peak 2 in [-1, 1]
            "usage": vq.codebook_usage(counts), "perplexity": vq.perplexity(counts)}


def train(args):
    check_positive(args, "steps", "batch_size", "lr", "limit")
    if not 2 <= args.codebook_size <= 65536:
        raise UserError(f"--codebook-size {args.codebook_size}: expected 2 to 65536 codes (stored as uint16)")
    check_seed(args)
    tokenizer_path = os.path.join(args.out, "tokenizer.pt")
    if not args.force:
        refuse_overwrite(tokenizer_path)
    make_dir(args.out)
    with user_errors():
        train_images, _, train_data = datasets.read_mnist(args.dataset, args.data_dir, "train", download=args.download)
        test_images, test_labels, test_data = datasets.read_mnist(args.dataset, args.data_dir, "test")
    if args.limit:  # the first N images of each split, for quick runs
        train_images = train_images[:args.limit]
        test_images, test_labels = test_images[:args.limit], test_labels[:args.limit]

    # The model, then the data order, from one seed: the same --seed gives the same weights
    torch.manual_seed(args.seed)
    model = vq.MnistVQ(num_codes=args.codebook_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_images = torch.from_numpy(train_images)  # (N, 28, 28) uint8
    order, position = torch.randperm(len(train_images)), 0
    start = time.time()
    bar = tqdm(range(args.steps), desc="train vq", unit="step")
    for step in bar:
        if position + args.batch_size > len(order):  # a new epoch, in a new order
            order, position = torch.randperm(len(train_images)), 0
        x = images.to_float(train_images[order[position:position + args.batch_size]])  # (B, 1, 28, 28)
        position += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup=100, final=0.1)  # cosine to lr / 10

        # The codebook moves inside the forward pass (EMA); the optimizer trains the encoder and decoder
        reconstruction, indices, commitment_loss = model(x)
        mse = F.mse_loss(reconstruction, x)
        loss = mse + commitment_loss
        if not torch.isfinite(loss):  # diverged: stop before anything is written over the last good run
            raise UserError(f"step {step}: the loss is {loss.item()}, not a finite number (reconstruction MSE "
                            f"{mse.item()}); lower --lr ({args.lr}); nothing was written to {args.out}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        if step % 10 == 0 or step == args.steps - 1:
            counts = vq.code_counts(indices, args.codebook_size)
            bar.set_postfix(mse=f"{mse.item():.4f}", usage=f"{vq.codebook_usage(counts):.2f}",
                            ppl=f"{vq.perplexity(counts):.0f}", restarts=model.quantizer.restarts)
    seconds = time.time() - start

    # Evaluate on the test split and save the run
    model.eval()
    test = reconstruction_metrics(model, test_images)
    if not math.isfinite(test["mse"]):  # the last update broke the weights
        raise UserError(f"step {args.steps - 1}: after its update the test reconstruction MSE is {test['mse']}, not "
                        f"a finite number; lower --lr ({args.lr}); nothing was written to {args.out}")
    metrics = {"dataset": args.dataset, "steps": args.steps, "batch_size": args.batch_size,
               "seconds": round(seconds, 1),  # the training loop, without loading and evaluation
               "train_images": len(train_images), "test_images": len(test_images),
               "num_codes": args.codebook_size, "code_dim": model.quantizer.dim, "grid": [model.grid_size] * 2,
               "test_mse": test["mse"], "test_psnr": test["psnr"],
               "test_usage": test["usage"], "test_perplexity": test["perplexity"],
               "restarts": model.quantizer.restarts,
               # what it was trained on: MD5 of the decompressed images files (support/datasets.py KNOWN_MD5)
               "data": {"dataset": args.dataset, "train_images_md5": train_data["images_md5"],
                        "test_images_md5": test_data["images_md5"]}}
    files.save_torch(tokenizer_path, tokenizers.mnist_checkpoint(model, metrics=metrics, args=vars(args)))
    columns = [int(np.nonzero(test_labels == c)[0][0]) for c in np.unique(test_labels)]  # one image per class
    originals = images.to_float(test_images[columns])  # (n, 1, 28, 28)
    reconstructions = model.decode(model.encode(originals))
    images.save_grid(np.concatenate([images.to_uint8(originals), images.to_uint8(reconstructions)]),
                     os.path.join(args.out, "recon.png"), nrow=len(columns), scale=4)
    files.write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"{args.out}: test MSE {test['mse']:.4f}, PSNR {test['psnr']:.2f} dB, codebook usage {test['usage']:.1%}, "
          f"perplexity {test['perplexity']:.1f}, {seconds:.0f} s")
    return metrics


# ---- Encoding an MNIST-format split into a code set ------------------------------------------------------

SHARD_SIZE = 100_000  # code grids per shard file


def write_codes(tokenizer, batches, total, out, shard_size=SHARD_SIZE):
    """Encode an iterable of (images (B, C, H, W), labels (B,)) batches into shards of OUT; returns
    (number of shards, grid (h, w), code counts (K,))."""
    codes, labels, shards, held = [], [], 0, 0
    counts = torch.zeros(tokenizer.codebook.shape[0], dtype=torch.long)
    with tqdm(total=total, desc="encode", unit="img") as bar:
        for x, batch_labels in batches:
            batch_codes = tokenizer.encode(x)  # (B, h, w)
            counts += vq.code_counts(batch_codes, len(counts))
            codes.append(batch_codes.cpu().numpy().astype(np.uint16))
            labels.append(np.asarray(batch_labels, dtype=np.int64))
            held += len(batch_codes)
            bar.update(len(batch_codes))
            if held >= shard_size:
                shards = flush_shard(out, shards, codes, labels, shard_size)
                held = sum(len(c) for c in codes)
    if held or shards == 0:
        shards = flush_shard(out, shards, codes, labels, held)
    return shards, tuple(batch_codes.shape[1:]), counts


def flush_shard(out, index, codes, labels, size):
    """Write the first `size` held code grids as shard `index`, keep the rest; returns the next shard index."""
    all_codes, all_labels = np.concatenate(codes), np.concatenate(labels)
    codesets.write_shard(out, index, all_codes[:size, None], all_labels[:size])  # (n, V = 1, h, w)
    codes[:], labels[:] = [all_codes[size:]], [all_labels[size:]]
    return index + 1


def code_set_out(args):
    """OUT/meta.json of the code set to write: an existing set stays unless --force; OUT is made and writable."""
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path) and not args.force:
        raise UserError(f"{args.out}: a code set already exists; pass --force to overwrite")
    make_dir(args.out)
    return meta_path


def encode(args):
    check_positive(args, "batch_size", "limit")
    if args.dataset == "imagefolder":
        return encode_imagefolder(args)
    if args.tokenizer in tokenizers.PRETRAINED:
        raise UserError(f"--tokenizer {args.tokenizer} encodes colour images (--dataset imagefolder); {args.dataset} "
                        f"wants a tokenizer of `tokenizer.py train` (RUN/tokenizer.pt)")
    if args.tokenizer_ckpt:
        raise UserError(f"--tokenizer-ckpt goes with a pretrained --tokenizer ({', '.join(tokenizers.PRETRAINED)}), "
                        f"not with {args.dataset}")
    meta_path = code_set_out(args)
    with user_errors():
        tokenizer = tokenizers.load(args.tokenizer)
        pixels, labels, data = datasets.read_mnist(args.dataset, args.data_dir, args.split)
    if args.limit:
        pixels, labels = pixels[:args.limit], labels[:args.limit]
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old set stops looking complete before any of its shards is replaced

    start = time.time()
    num_shards, grid, counts = write_codes(tokenizer, mnist_batches(pixels, labels, args.batch_size), len(pixels),
                                           args.out)
    meta = codesets.write_meta(args.out, tokenizer.codebook.cpu().numpy(), num_shards, grid=list(grid),
                           num_classes=10, views=1, class_names=datasets.CLASS_NAMES[args.dataset],
                           dataset=args.dataset, split=args.split, image_shape=[1, 28, 28],
                           tokenizer=tokenizers.record(args.tokenizer),
                           data=data)  # {dataset, split, images_md5}: which files the images came from
    print(f"{args.out}: {meta['num_images']} code grids {grid[0]}x{grid[1]} in {num_shards} shard(s), "
          f"codebook usage {vq.codebook_usage(counts):.1%}, perplexity {vq.perplexity(counts):.1f}, "
          f"{time.time() - start:.0f} s")
    return meta


# ---- Encoding an ImageFolder tree (ImageNet) with a pretrained tokenizer, sharded across torchrun ranks ----

IMAGEFOLDER_SHARD = 10_000  # images per shard: 10,000 x 2 views x 32 x 32 codes x 2 bytes = 41 MB


def encode_shard(tokenizer, loader, device):
    """Codes uint16 (n, 2, h, w) of every image of `loader` and of its horizontal flip; ValueError naming the first
    image that could not be read."""
    codes = []
    for x, _, problems in loader:
        problem = next((p for p in problems if p), None)
        if problem:
            raise ValueError(problem)
        x = x.to(device)
        views = torch.stack([tokenizer.encode(x), tokenizer.encode(x.flip(3))], 1)  # (B, 2, h, w)
        codes.append(views.cpu().numpy())
    return np.concatenate(codes)


def encode_imagefolder(args):
    """Center-crop every image (ADM's preprocessing) and encode it and its horizontal flip: views V = 2.

    Shard i holds images [i * S, (i + 1) * S) of the sorted file list. Under torchrun, rank r encodes the shards
    i = r, r + world, ...; a shard already on disk is skipped, so an interrupted run resumes where it stopped.
    Rank 0 writes meta.json last, once every shard is there. An unreadable image or a failed write is met by one
    rank only, in its own shard: that rank names it (cli.UserError's rank_local).
    """
    if args.tokenizer not in tokenizers.PRETRAINED:
        raise UserError(f"--dataset imagefolder wants a pretrained tokenizer: --tokenizer "
                        f"{{{', '.join(tokenizers.PRETRAINED)}}} --tokenizer-ckpt PATH")
    check_positive(args, "image_size", "shard_size")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 (decode in this process) or more")
    meta_path = code_set_out(args)
    with distributed.processes() as (rank, world, device):
        with user_errors():
            paths, labels, classes = datasets.list_imagefolder(args.data_dir)
        if args.limit:
            paths, labels = paths[:args.limit], labels[:args.limit]
        with user_errors():
            tokenizer = tokenizers.load(args.tokenizer, args.tokenizer_ckpt, device)
        if args.image_size % tokenizer.downsample:
            raise UserError(f"--image-size {args.image_size} is not a multiple of the tokenizer's "
                            f"downsampling factor {tokenizer.downsample}")
        if rank == 0:
            if args.force and os.path.exists(meta_path):
                os.remove(meta_path)
                for name in os.listdir(args.out):
                    if name.startswith(("codes-", "labels-")):
                        os.remove(os.path.join(args.out, name))
        distributed.barrier(world)  # --force has cleared the old shards before any rank looks for them

        num_shards = (len(paths) + args.shard_size - 1) // args.shard_size
        todo = [i for i in range(rank, num_shards, world) if not codesets.shard_done(args.out, i)]
        for i in tqdm(todo, desc=f"shards (rank {rank})", position=rank, unit="shard"):
            lo, hi = i * args.shard_size, min((i + 1) * args.shard_size, len(paths))
            shard = datasets.ImageFolderImages(paths[lo:hi], labels[lo:hi], args.image_size)
            loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers)
            try:
                codesets.write_shard(args.out, i, encode_shard(tokenizer, loader, device), labels[lo:hi])
            except ValueError as e:  # an image of this shard is unreadable
                raise UserError(str(e), rank_local=True) from None
            except OSError as e:  # the disk is full, or the directory stopped being writable
                raise UserError(f"{args.out}: cannot write shard {i} ({e.strerror or e})", rank_local=True) from None
        distributed.barrier(world)  # every shard is on disk

        if rank == 0:
            grid = [args.image_size // tokenizer.downsample] * 2
            meta = codesets.write_meta(args.out, tokenizer.codebook.cpu().numpy(), num_shards, grid=grid,
                                   num_classes=len(classes), views=2, class_names=classes, dataset="imagefolder",
                                   data_dir=os.path.abspath(args.data_dir), image_shape=[3, args.image_size,
                                   args.image_size], tokenizer=tokenizers.record(args.tokenizer, args.tokenizer_ckpt))
            print(f"{args.out}: {meta['num_images']} images x 2 views, {grid[0]}x{grid[1]} codes, "
                  f"{num_shards} shard(s)")


# ---- Command line ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description="Train the MNIST / Fashion-MNIST VQ tokenizer, or encode a dataset "
                                            "into a code set for train.py.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a tokenizer: RUN/tokenizer.pt, recon.png, metrics.json")
    t.add_argument("--dataset", choices=DATASETS, required=True)
    t.add_argument("--data-dir", required=True, help="directory of the IDX files")
    t.add_argument("--out", required=True, help="run directory RUN")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (Adam, cosine decay)")
    t.add_argument("--codebook-size", type=int, default=256, help="K, the number of codes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, help="use only the first N images of each split (quick tests)")
    t.add_argument("--download", action="store_true", help="fetch missing IDX files into --data-dir")
    t.add_argument("--force", action="store_true",
                   help="replace the tokenizer.pt of an earlier run in --out: code sets and flows made with it can "
                        "no longer be decoded")

    e = sub.add_parser("encode", help="encode a split into a code set (support/codesets.py) for train.py")
    e.add_argument("--tokenizer", required=True,
                   help="RUN/tokenizer.pt written by `tokenizer.py train`, or llamagen-vq8 / llamagen-vq16 / ldm-vq8")
    e.add_argument("--tokenizer-ckpt", help="the weights of a pretrained tokenizer (vq_ds8_c2i.pt, vq_ds16_c2i.pt; "
                                            "ldm-vq8: model.ckpt of latent-diffusion's vq-f8.zip)")
    e.add_argument("--dataset", choices=DATASETS + ("imagefolder",), required=True)
    e.add_argument("--data-dir", required=True, help="directory of the IDX files, or the root of an ImageFolder tree")
    e.add_argument("--image-size", type=int, default=256, help="imagefolder: center-crop size")
    e.add_argument("--shard-size", type=int, default=IMAGEFOLDER_SHARD, help="imagefolder: images per shard")
    e.add_argument("--workers", type=int, default=4, help="imagefolder: image-decoding worker processes")
    e.add_argument("--split", choices=("train", "test"), default="train")
    e.add_argument("--out", required=True, help="code set directory CODES")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--limit", type=int, help="encode only the first N images of the split")
    e.add_argument("--force", action="store_true", help="overwrite an existing code set in --out")
    config.add_config_flag(t)
    config.add_config_flag(e)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0] in ("train", "encode"):
        config.apply_preset(t if argv[0] == "train" else e, argv[1:], f"tokenizer-{argv[0]}")
    return p.parse_args(argv)


def main(argv=None):
    def command():
        args = parse_args(argv)
        return {"train": train, "encode": encode}[args.command](args)

    return run_command(command)


if __name__ == "__main__":
    main()
