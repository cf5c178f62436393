"""A seeded synthetic knowledge graph that a model can learn: planted entity types, clusters and relation patterns.

Entities are split into ``types`` types, each type into clusters of ``cluster_size`` entities. Each
relation r goes from a head type A_r to a tail type B_r and maps every cluster of A_r onto one
cluster of B_r (a seeded random map). A triple (h, r, t): r drawn with Zipf-like popularity, h from
A_r with Zipf-like popularity within the type, t uniformly from the cluster that r maps h's cluster
to; with probability ``noise`` t is any entity of B_r instead. So (h, r) determines a set of
``cluster_size`` likely tails, which a model can learn from the other members of h's cluster.

The 100,000-triple graph is the first 100,000 distinct triples of the same stream as the 1,000,000
one, so both come from one generator.
"""

from __future__ import annotations

import numpy as np


def planted_graph(num_triples: int, *, num_entities: int = 50_000, num_relations: int = 200, types: int = 20,
                  cluster_size: int = 10, noise: float = 0.05, num_test: int = 2_000, seed: int = 0):  # fmt: skip
    """(train, valid, test) id triples, each (n, 3) int64, distinct and disjoint; train has ``num_triples`` rows."""
    rng = np.random.default_rng(seed)
    per_type = num_entities // types
    clusters_per_type = per_type // cluster_size
    entity_ids = rng.permutation(num_entities)  # type t, cluster c, member m -> an id scattered over 0..E-1
    head_type = rng.integers(0, types, num_relations)
    tail_type = rng.integers(0, types, num_relations)
    cluster_map = np.stack([rng.permutation(clusters_per_type) for _ in range(num_relations)])
    relation_p = (np.arange(num_relations) + 1.0) ** -0.8
    relation_p /= relation_p.sum()
    within_p = (np.arange(per_type) + 1.0) ** -0.6  # head popularity within a type
    within_p /= within_p.sum()

    def entity(kind: np.ndarray, position: np.ndarray) -> np.ndarray:
        return entity_ids[kind * per_type + position]

    def draw(n: int) -> np.ndarray:
        r = rng.choice(num_relations, size=n, p=relation_p)
        head_pos = rng.choice(per_type, size=n, p=within_p)
        tail_cluster = cluster_map[r, head_pos // cluster_size]
        tail_pos = tail_cluster * cluster_size + rng.integers(0, cluster_size, n)
        noisy = rng.random(n) < noise
        tail_pos[noisy] = rng.integers(0, clusters_per_type * cluster_size, int(noisy.sum()))
        return np.stack([entity(head_type[r], head_pos), r, entity(tail_type[r], tail_pos)], axis=1).astype(np.int64)

    wanted = num_triples + 2 * num_test
    seen: dict[tuple[int, int, int], None] = {}
    while len(seen) < wanted:  # fixed chunks: every size reads the same stream
        for row in map(tuple, draw(100_000).tolist()):
            seen.setdefault(row, None)
            if len(seen) >= wanted:
                break
    rows = np.array(list(seen), dtype=np.int64)
    return rows[:num_triples], rows[num_triples : num_triples + num_test], rows[num_triples + num_test :]


def labels(rows: np.ndarray) -> np.ndarray:
    """Label triples ('e123', 'r4', 'e99') for TSV files."""
    return np.stack([np.char.add("e", rows[:, 0].astype(str)), np.char.add("r", rows[:, 1].astype(str)),
                     np.char.add("e", rows[:, 2].astype(str))], axis=1)  # fmt: skip
