"""Issue 38, item 3: the associative memory as the evaluation's continual learner, measured.

An elastic associative memory written only from scored tokens: keys are the model's kNN queries
(a fixed projection of its features), values next-token counts. Locations are created where a
key is novel (its best similarity under NOVELTY), an overloaded one splits (its counts halved
with a jittered child), mutually nearest near-duplicates merge (counts and key sums added); a
location's address is the normalised sum of the keys written to it. Capacity is fixed. A read
weighs a query's top-k locations by softmax(beta * similarity) over their smoothed count
distributions, (n q + alpha / V) / (n + alpha); it mixes in as the kNN store does, with
lambda = KNN_LAMBDA x the best similarity (prefix only). It stands in for the kNN store inside
train_gpt.evaluate, so both are measured on the same artifacts, windows and chunks:

    PYTHONPATH=<checkout> python elastic.py ARTIFACT [knn|elastic|none] LAMBDA VAL_TOKENS [centred]

With `centred` both stores' keys are the projection of the features less their mean over the
first 65,536 training tokens (training data: legal): the raw features share one direction
(their keys' mean cosine is ~0.92), which flattens every similarity.
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

import train_gpt

CAPACITY, NOVELTY, MERGE, SPLIT_COUNT, ALPHA = 8192, 0.9, 0.98, 512, 1.0


class ElasticStore:
    def __init__(self, capacity, dim, device):
        self.capacity = min(capacity, CAPACITY)
        self.addresses = torch.zeros(self.capacity, dim)
        self.key_sums = torch.zeros(self.capacity, dim)
        self.counts = torch.zeros(self.capacity, VOCAB)
        self.size = 0
        self.generator = torch.Generator().manual_seed(0)
        self.events = dict(created=0, splits=0, merges=0)
        self.keys, self.targets = self.addresses, self.counts  # what evaluate's log line sizes
        STORE[0] = self

    def add(self, keys, targets):
        keys = F.normalize(keys.float(), dim=1)
        free = self.capacity - self.size
        if self.size:
            best = (keys @ self.addresses[: self.size].T).max(1).values
            novel = (best < NOVELTY).nonzero().squeeze(1)
        else:
            novel = torch.arange(keys.size(0))
        if free and novel.numel():
            pair = keys[novel] @ keys[novel].T
            shadowed = torch.tril(pair >= NOVELTY, diagonal=-1).any(1)
            founders = novel[~shadowed][:free]
            new = slice(self.size, self.size + founders.numel())
            self.addresses[new] = keys[founders]
            self.size += founders.numel()
            self.events["created"] += founders.numel()
        nearest = (keys @ self.addresses[: self.size].T).argmax(1)
        self.counts.index_put_((nearest, targets.cpu()), torch.ones(targets.numel()),
                               accumulate=True)
        self.key_sums.index_add_(0, nearest, keys)
        touched = nearest.unique()
        self.addresses[touched] = F.normalize(self.key_sums[touched], dim=1)
        self.split()
        self.merge()

    def split(self):
        totals = self.counts[: self.size].sum(1)
        parents = (totals > SPLIT_COUNT).nonzero().squeeze(1)[: self.capacity - self.size]
        if not parents.numel():
            return
        jitter = 0.05 * torch.randn(parents.numel(), self.addresses.size(1),
                                    generator=self.generator)
        children = slice(self.size, self.size + parents.numel())
        self.addresses[children] = F.normalize(self.addresses[parents] + jitter, dim=1)
        self.counts[parents] *= 0.5
        self.key_sums[parents] *= 0.5
        self.counts[children] = self.counts[parents]
        self.key_sums[children] = self.key_sums[parents]
        self.size += parents.numel()
        self.events["splits"] += parents.numel()

    def merge(self):
        active = self.addresses[: self.size]
        sims = active @ active.T
        sims.fill_diagonal_(-2)
        nearest_sim, nearest = sims.max(1)
        index = torch.arange(self.size)
        first = index[(nearest[nearest] == index) & (index < nearest) & (nearest_sim > MERGE)]
        if not first.numel():
            return
        second = nearest[first]
        self.counts[first] += self.counts[second]
        self.key_sums[first] += self.key_sums[second]
        self.addresses[first] = F.normalize(self.key_sums[first], dim=1)
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[second] = False
        kept = int(keep.sum())
        for table in (self.addresses, self.key_sums, self.counts):
            table[:kept] = table[: self.size][keep].clone()
            table[kept: self.size] = 0
        self.size = kept
        self.events["merges"] += first.numel()

    def search(self, queries, k, chunk=0):
        if not self.size:
            return (torch.full((queries.size(0), k), -math.inf),
                    torch.zeros(queries.size(0), k, dtype=torch.long))
        sims = F.normalize(queries.float(), dim=1) @ self.addresses[: self.size].T
        top, index = sims.topk(min(k, self.size), dim=1)
        return top, index


def elastic_mix(log_probs, sims, index, beta, lam):
    store = STORE[0]
    weights = torch.softmax(beta * sims, dim=1).nan_to_num(0.0)
    counts = store.counts[index]  # [N, k, V]
    totals = counts.sum(2, keepdim=True)
    smoothed = (counts + ALPHA / VOCAB) / (totals + ALPHA)
    p_assoc = (weights[:, :, None] * smoothed).sum(1)
    lam = lam[:, None]
    return torch.log((1 - lam) * log_probs.exp() + lam * p_assoc)


STORE = [None]
VOCAB = 1024

if __name__ == "__main__":
    path, mode, lam, val_tokens = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    args = train_gpt.Hyperparameters.from_env({
        "PROFILE": "cpu_proxy", "VAL_TOKENS": str(val_tokens), "ARTIFACT_PATH": path,
        "EVAL_ONLY": "1", "KNN_LAMBDA": str(lam if mode != "none" else 0.0),
        "MAX_WALLCLOCK_SECONDS": "20000",
        "DATA_PATH": "../shared/data/webmix_sp1024",
        "TOKENIZER_PATH": "../shared/data/tokenizers/fineweb_1024_bpe.model"})
    if mode == "elastic":
        train_gpt.KnnStore = ElasticStore
        train_gpt.knn_mix = elastic_mix
    tokens = train_gpt.load_validation_tokens(args)
    if len(sys.argv) > 5 and sys.argv[5] == "centred":
        model_class = train_gpt.MemoryLM
        real_load = train_gpt.load_artifact

        def load_centred(path, device, sha256=""):
            model = real_load(path, device, sha256)
            train = torch.from_numpy(train_gpt.read_shard(train_gpt.shard_paths(
                args.data_path, "train")[0])[:65536].astype("int64")).view(-1, 256)
            with torch.no_grad():
                mean = model.features(train).flatten(0, 1).mean(0)
            model.query = lambda features: F.normalize(
                (features.float() - mean) @ model.projection, dim=-1)
            return model
        train_gpt.load_artifact = load_centred
    started = time.perf_counter()
    _, totals = train_gpt.score_artifact(train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None),
                                         args, train_gpt.Path(path), tokens)
    name = "knn" if "knn" in totals else "model"
    loss, bpb, count = totals[name].reduced(train_gpt.Runtime(0, 1, 0, torch.device("cpu"), None))
    extra = STORE[0].events | {"locations": STORE[0].size} if STORE[0] else {}
    print(f"result artifact:{path} mode:{mode} lambda:{lam} tokens:{count} val_bpb:{bpb:.6f} "
          f"seconds:{time.perf_counter() - started:.0f} "
          + " ".join(f"{k}:{v}" for k, v in extra.items()))
