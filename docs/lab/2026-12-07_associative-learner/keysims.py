"""How alike the kNN store's keys are: cosine similarities of 4,000 positions' keys with 4,000
others (the first 8,192 validation tokens), raw and centred on their own mean.

    PYTHONPATH=<checkout> python keysims.py   # reads l16.eam (the learned-lengths entry)
"""

import torch

import train_gpt

SPLIT = "../shared/data/webmix_sp1024/fineweb_val_000000.bin"


def report(label: str, keys: torch.Tensor) -> None:
    sims = keys[:4000] @ keys[4000:8000].T
    nearest = sims.max(1).values
    print(label, "mean", sims.mean().item(), "nearest (median, 10%, 90%)",
          nearest.median().item(), nearest.quantile(0.1).item(), nearest.quantile(0.9).item())


torch.set_num_threads(1)
model = train_gpt.load_artifact(train_gpt.Path("l16.eam"), torch.device("cpu"))
tokens = torch.from_numpy(train_gpt.read_shard(train_gpt.Path(SPLIT))[:32 * 256].astype("int64"))
with torch.no_grad():
    keys = model.query(model.features(tokens.view(32, 256)).flatten(0, 1))
report("raw:", keys)
report("centred:", torch.nn.functional.normalize(keys - keys.mean(0), dim=1))
