"""Train a bundled reference model and write its checkpoint (fp16 state dict) and metadata.

    python -m mpq.models.train digits-cnn
    python -m mpq.models.train char-lm
    python -m mpq.models.train llama-lm
    python -m mpq.models.train hf-gpt2      # transformers' GPT2LMHeadModel (the [hf] extra)
    python -m mpq.models.train hf-llama     # transformers' LlamaForCausalLM

Checkpoints are stored in fp16 to stay under 2 MB; the metric in the metadata is measured after that rounding, on
the weights as they load.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch

from mpq.models import CHECKPOINTS, checkpoint_path, reference_names, task_builder

log = logging.getLogger("mpq.models.train")


def save(model: torch.nn.Module, name: str, meta: dict) -> None:
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(name)
    torch.save({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s (%.1f kB)", path, path.stat().st_size / 1e3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=reference_names())
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    mod = task_builder(args.name)
    model, meta = mod.train()
    meta.update({"torch": torch.__version__, "machine": platform.machine(),
                 "train_seconds": round(time.time() - t0, 1)})
    save(model, args.name, meta)
    # Measure the metric on the weights exactly as they load (fp16-rounded).
    task = mod.load_task()
    meta[task.metric] = task.eval_fn(task.model)
    save(model, args.name, meta)
    log.info("%s: %s = %.4f", args.name, task.metric, meta[task.metric])


if __name__ == "__main__":
    main()
