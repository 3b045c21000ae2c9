"""Train a small GPT, byte by byte, on text that ships with the repository (its docs): no download.

    python examples/gpt/train.py --max-epochs 1                          # one process
    torchrun --nproc-per-node 2 examples/gpt/train.py --strategy fsdp    # sharded over 2 processes
    torchrun --nproc-per-node 2 examples/gpt/train.py --strategy ddp     # replicated, for comparison

The model is built on the meta device and materialised by `ig.prepare` (already sharded under
fsdp), so it never exists whole on a rank. `--data` may point at any folder of text files.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from model import GPT, GPTConfig, gpt2_init
from torch.utils.data import DataLoader, Dataset

import igniter_dist as ig

DOCS = Path(__file__).resolve().parents[2] / "docs"
SUFFIXES = (".md", ".txt", ".rst", ".py")


def corpus(folder: str) -> bytes:
    """Every text file below `folder`, in a fixed order, as one byte string."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise ig.ConfigError(f"--data {folder} holds no text files ({', '.join(SUFFIXES)}); "
                             "point it at a folder that does.")
    return b"\n".join(p.read_bytes() for p in files)


class Windows(Dataset):
    """Consecutive windows of `block + 1` bytes: the inputs and, shifted by one, the targets."""

    def __init__(self, data: bytes, block: int):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.block = block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.block: (i + 1) * self.block + 1]
        return chunk[:-1], chunk[1:]


def main(args):
    text = corpus(args.data)
    split = len(text) * 9 // 10
    train_set, eval_set = Windows(text[:split], args.block_size), Windows(text[split:], args.block_size)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size or args.batch_size)

    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       dropout=args.dropout)
    with torch.device("meta"):
        gpt = GPT(config)
    model = ig.prepare(gpt, init=gpt2_init(gpt))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)

    def loss_of(logits, targets):
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))

    def train_step(engine, batch):
        inputs, targets = batch
        model.train()
        loss = loss_of(model(inputs), targets)
        engine.backward(loss)
        engine.optimizer_step(optimizer)
        return {"loss": loss.detach()}

    def eval_step(engine, batch):
        inputs, targets = batch
        return {"loss": loss_of(model(inputs), targets)}

    metrics = ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
        eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics={"loss": "loss"}),
        **ig.train_kwargs(args),
        parameters=vars(args),
    )
    if ig.runtime().is_main:
        print(f"final eval loss {metrics['eval/loss']:.4f} nats per byte")


def add_flags(parser):
    parser.add_argument("--block-size", type=int, default=64, help="Bytes of context.")
    parser.add_argument("--n-layer", type=int, default=4, help="Transformer blocks.")
    parser.add_argument("--n-head", type=int, default=4, help="Attention heads per block.")
    parser.add_argument("--n-embd", type=int, default=128, help="Width of the residual stream.")
    parser.add_argument("--dropout", type=float, default=0.0, help="Dropout probability.")
    parser.set_defaults(learning_rate=1e-3, batch_size=32, workers=0, max_epochs=2, grad_clip_norm=1.0)


if __name__ == "__main__":
    ig.igniter_main(main, inputs={"data": os.fspath(DOCS)}, argparse_callback=add_flags,
                    description=__doc__.splitlines()[0])
