"""Client partitions built with flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.data import DOMAINS, client_datasets, partition_dataset


def _mean_max_share(parts) -> float:
    """Mean over clients of the largest domain share: 1 = one domain per client."""
    shares = []
    for part in parts:
        _, counts = np.unique(part["domain"], return_counts=True)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


@pytest.mark.parametrize("scheme", ["natural", "dirichlet", "iid"])
def test_sizes_sum_to_dataset(small_corpus, scheme):
    # Prepare
    train = small_corpus["train"]

    # Execute
    parts = partition_dataset(train, num_clients=8, scheme=scheme, alpha=0.5, seed=0)

    # Assert
    assert len(parts) == 8
    assert sum(len(p) for p in parts) == len(train)
    assert all(len(p) > 0 for p in parts)
    assert set().union(*(set(p["text"]) for p in parts)) == set(train["text"])


def test_natural_one_domain_per_client_several_clients_per_domain(small_corpus):
    # Execute
    parts = partition_dataset(small_corpus["train"], num_clients=8, scheme="natural")

    # Assert: client i holds sorted(DOMAINS)[i % 4] only, two clients per domain, balanced
    domains = sorted(DOMAINS)
    for i, part in enumerate(parts):
        assert set(part["domain"]) == {domains[i % 4]}
    for d in range(4):
        assert abs(len(parts[d]) - len(parts[d + 4])) <= 1


def test_natural_with_fewer_clients_than_domains_drops_domains(small_corpus):
    # Execute
    parts = partition_dataset(small_corpus["train"], num_clients=2, scheme="natural")

    # Assert
    assert [set(p["domain"]) for p in parts] == [{sorted(DOMAINS)[0]}, {sorted(DOMAINS)[1]}]


def test_dirichlet_small_alpha_is_more_heterogeneous(small_corpus):
    # Prepare
    train = small_corpus["train"]

    # Execute
    skewed = [_mean_max_share(partition_dataset(train, 8, "dirichlet", alpha=0.1, seed=s))
              for s in range(3)]
    mixed = [_mean_max_share(partition_dataset(train, 8, "dirichlet", alpha=100.0, seed=s))
             for s in range(3)]

    # Assert: near-uniform mixing gives a max share near the largest domain's share (~0.3)
    assert np.mean(skewed) > np.mean(mixed) + 0.2
    assert np.mean(mixed) < 0.45


@pytest.mark.parametrize("num_clients", [1, 2, 3])
def test_dirichlet_works_for_few_clients(small_corpus, num_clients):
    # Execute
    parts = partition_dataset(small_corpus["train"], num_clients, "dirichlet", alpha=0.5)

    # Assert
    assert sum(len(p) for p in parts) == len(small_corpus["train"])


def test_dirichlet_impossible_names_config_keys(small_corpus):
    # Execute / Assert: 400 clients on ~900 rows with alpha 0.01 leaves clients empty
    with pytest.raises(ValueError, match=r"data\.alpha=0\.01.*data\.num_clients=400"):
        partition_dataset(small_corpus["train"], 400, "dirichlet", alpha=0.01)


def test_iid_domain_mix_is_near_uniform(small_corpus):
    # Prepare
    train = small_corpus["train"]
    overall = {d: train["domain"].count(d) / len(train) for d in DOMAINS}

    # Execute
    parts = partition_dataset(train, num_clients=4, scheme="iid", seed=0)

    # Assert: every client's domain shares are within 0.08 of the global shares
    for part in parts:
        for d in DOMAINS:
            assert abs(part["domain"].count(d) / len(part) - overall[d]) < 0.08


def test_partitions_are_deterministic(small_corpus):
    # Execute
    first = partition_dataset(small_corpus["train"], 5, "dirichlet", alpha=0.3, seed=7)
    second = partition_dataset(small_corpus["train"], 5, "dirichlet", alpha=0.3, seed=7)

    # Assert
    assert [p["text"] for p in first] == [p["text"] for p in second]


def test_unknown_scheme_names_config_key(small_corpus):
    # Execute / Assert
    with pytest.raises(ValueError, match=r"data\.partition 'shards'.*natural.*dirichlet.*iid"):
        partition_dataset(small_corpus["train"], 4, "shards")


@pytest.mark.parametrize("scheme", ["natural", "iid"])
def test_client_validation_matches_split_of_validation(small_corpus, scheme):
    # Execute
    clients = client_datasets(small_corpus, num_clients=8, scheme=scheme, seed=0)

    # Assert: validation rows are partitioned (no overlap) and hold only the train domains
    val_texts = [set(c.validation["text"]) for c in clients]
    assert sum(map(len, val_texts)) == len(set(small_corpus["validation"]["text"]))
    for client in clients:
        assert len(client.validation) > 0
        assert set(client.validation["domain"]) <= set(client.domains)
    if scheme == "natural":
        assert [c.domains for c in clients] == [[sorted(DOMAINS)[i % 4]] for i in range(8)]
        assert all(set(c.validation["domain"]) == set(c.domains) for c in clients)


def test_dirichlet_validation_follows_train_mix(small_corpus):
    # Execute
    clients = client_datasets(small_corpus, num_clients=4, scheme="dirichlet", alpha=0.3, seed=1)

    # Assert: per domain, validation share within 0.1 of the train share
    for client in clients:
        val = client.validation["domain"]
        for domain, share in client.domain_shares.items():
            assert abs(val.count(domain) / len(val) - share) < 0.1, (client.client_id, domain)
        assert set(val) <= set(client.domains)
