"""Location embedding: network shape, triplet loss, training/resume, regions, pictures, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from geomoe.cli import app
from geomoe.config import load_config
from geomoe.data.datasets import prepare
from geomoe.data.synthetic import make_synthetic
from geomoe.embedding.extract import Embeddings, extract
from geomoe.embedding.losses import batch_triplet_loss, cosine_distance
from geomoe.embedding.model import LocationAutoencoder, load_embedding
from geomoe.embedding.regions import fit_kmeans, score
from geomoe.embedding.train import train_embedding
from geomoe.experts.model import Expert


def test_paper_network_has_5x5_bottleneck_and_2048d_unit_embedding():
    m = LocationAutoencoder("resnet34", 2048, 160).eval()
    x = torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)
    target, z = m.bottleneck(x)
    assert z.shape == (2, 512, 5, 5) and target.shape == (2, 3, 160, 160)
    e, rec, _ = m(x)
    assert e.shape == (2, 2048) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    assert rec.shape == target.shape


def test_triplet_loss_uses_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(cosine_distance(a, a), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert batch_triplet_loss(separated, labels, margin=0.3).item() == 0.0
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # every anchor's positive is orthogonal (d=1) and some negative identical (d=0): loss 1 + margin
    assert batch_triplet_loss(mixed, labels, margin=0.3, semi_hard=True).item() == pytest.approx(1.3)
    assert batch_triplet_loss(separated, torch.zeros(4, dtype=torch.long), 0.3) is None


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.125)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    assert torch.all(LocationAutoencoder("resnet18", 16, 64, tmp_path / "r18.pth").encoder.conv1.weight == 0.125)
    assert torch.all(Expert("resnet18", "FPN", pretrained=tmp_path / "r18.pth").net.encoder.conv1.weight == 0.125)
    with pytest.raises(ValueError, match="r18.pth: weights for another architecture"):
        Expert("resnet34", pretrained=tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth: weights for another architecture"):
        Expert("efficientnet-b0", pretrained=tmp_path / "r18.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth: not found"):
        Expert("resnet18", pretrained=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a state dict")
    with pytest.raises(ValueError, match="junk.pth: cannot be read as a PyTorch state dict"):
        Expert("resnet18", pretrained=tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    cfg = load_config("tiny")
    prep = prepare(synth_root, cfg.data, cfg.seed)
    out = tmp_path_factory.mktemp("emb")
    path = train_embedding(prep, cfg, out, progress=False)
    return cfg, prep, out, path


def test_training_logs_both_losses_and_resumes(trained):
    cfg, prep, out, path = trained
    metrics = pd.read_csv(next((out / "run" / "logs").glob("version_*/metrics.csv")))
    epochs = metrics.dropna(subset=["triplet_epoch"])
    assert len(epochs) == cfg.embedding.epochs
    assert (epochs.triplet_epoch > 0).all() and (epochs.reconstruction_epoch > 0).all()  # both terms are really on
    ck = torch.load(out / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == cfg.embedding.epochs * cfg.embedding.steps_per_epoch
    # a finished job is not trained again
    before = path.stat().st_mtime_ns
    train_embedding(prep, cfg, out, progress=False)
    assert path.stat().st_mtime_ns == before
    # asked for one more epoch, an unfinished run resumes from its last checkpoint instead of starting over
    path.unlink()
    more = cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"epochs": cfg.embedding.epochs + 1})})
    train_embedding(prep, more, out, progress=False)
    ck2 = torch.load(out / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck2["global_step"] == (cfg.embedding.epochs + 1) * cfg.embedding.steps_per_epoch
    assert load_embedding(path)[1]["steps"] == ck2["global_step"]


def test_extract_and_regions(trained, tmp_path):
    cfg, prep, out, path = trained
    model, meta = load_embedding(path)
    assert meta["triplet"] is True and meta["locations"] == ["loc0", "loc1", "loc2"]
    emb = extract(model, prep, batch_size=8, progress=False)
    assert emb.vectors.shape[1] == cfg.embedding.dim and set(emb.split) == {"train", "val", "test"}
    assert set(emb.location) == {"loc0", "loc1", "loc2"} and emb.window.shape == (len(emb), 3)
    emb.save(tmp_path / "e.npz")
    back = Embeddings.load(tmp_path / "e.npz")
    assert np.array_equal(back.vectors, emb.vectors) and list(back.scene) == list(emb.scene)
    with pytest.raises(ValueError, match="larger than the number of patches"):
        fit_kmeans(emb.vectors, len(emb) + 1)


def test_regions_score_perfect_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16)
    v = np.concatenate([centres[i] + 0.05 * rng.normal(size=(20, 16)) for i in range(3)]).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    loc = np.repeat(["a", "b", "c"], 20)
    split = np.tile(["train"] * 15 + ["val"] * 5, 3)
    emb = Embeddings(v, loc, np.repeat("s", 60), np.zeros((60, 3), int), split)
    s = score(emb, fit_kmeans(v[split == "train"], 3))
    assert s.purity == 1.0 and s.nmi == pytest.approx(1.0) and s.held_out_majority == 1.0 and s.silhouette > 0.8


def test_single_location_trains_plain_autoencoder_with_warning(tmp_path):
    root = make_synthetic(tmp_path / "one", n_locations=1, scenes_per_location=2, size=128)
    cfg = load_config("tiny")
    cfg = cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"epochs": 1, "steps_per_epoch": 1})})
    with pytest.warns(UserWarning, match="no negatives exist"):
        path = train_embedding(prepare(root, cfg.data), cfg, tmp_path / "o", progress=False)
    assert load_embedding(path)[1]["triplet"] is False


def test_cli_chain_and_mismatched_files(trained, tmp_path):
    cfg, prep, out, path = trained
    r = CliRunner()
    root = str(prep.catalog.root)
    res = r.invoke(app, ["embed", "extract", root, "-m", str(path), "-o", str(tmp_path / "e.npz"), "-c", "tiny"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["regions", "fit", str(tmp_path / "e.npz"), "--k", "3", "-o", str(tmp_path / "reg"), "--sweep", "2,3"])
    assert res.exit_code == 0, res.output
    assert "held-out in majority cluster" in (tmp_path / "reg" / "regions.md").read_text()
    assert np.load(tmp_path / "reg" / "centroids.npy").shape == (3, cfg.embedding.dim)
    res = r.invoke(app, ["embed", "plot", str(tmp_path / "e.npz"), "--centroids", str(tmp_path / "reg" / "centroids.npy"),
                         "-o", str(tmp_path / "plots"), "-c", "tiny"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "plots" / "embedding_space.png").stat().st_size > 10000
    assert (tmp_path / "plots" / "region_samples.png").exists()
    np.save(tmp_path / "bad.npy", np.ones((3, 7), np.float32))
    res = r.invoke(app, ["embed", "plot", str(tmp_path / "e.npz"), "--centroids", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "p2")])
    assert res.exit_code == 1 and "do not match" in res.output
    res = r.invoke(app, ["regions", "fit", str(tmp_path / "e.npz"), "--k", "100000", "-o", str(tmp_path / "r2")])
    assert res.exit_code == 1 and "larger than the number of patches" in res.output
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    res = r.invoke(app, ["regions", "fit", str(tmp_path / "junk.npz"), "-o", str(tmp_path / "r3")])
    assert res.exit_code == 1 and "not an embeddings file" in res.output
