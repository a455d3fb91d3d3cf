"""The footprint stage alone (band writer, workers, layers) on a perfect model: the Banepa mosaic's truth blurred into
building and boundary channels, laid out n x n times. Usage: footprint_profile.py N WORKERS [MOSAIC] (on the GPU machine,
from .gpu/, where pack.sh puts it)."""
import cProfile, pstats, sys, time, tempfile
from pathlib import Path
import numpy as np, rasterio
from scipy import ndimage
from geomoe.config import PredictConfig
from geomoe.pipelines.outputs import outputs_for
from geomoe.pipelines.writers import Band, BandWriter, SceneWriters
from geomoe.pipelines.calibration import Calibration, Calibrations
from geomoe.pipelines.instances import Separation

def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    band_h = 384
    src = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent / "data/banepa/scene/banepa_mosaic.tif"
    with rasterio.open(src.with_name("banepa_mosaic_mask.tif")) as m:
        truth = m.read(1) > 0
    truth = np.tile(truth, (n, n))
    b = ndimage.gaussian_filter(truth.astype(np.float32), 1.5)
    edge = truth ^ ndimage.binary_erosion(truth, iterations=2)
    bd = ndimage.gaussian_filter(edge.astype(np.float32), 1.0) * 2
    prob = np.stack([b, np.clip(bd, 0, 1), np.zeros_like(b)])
    H, W = truth.shape
    print("scene", W, H, flush=True)

    class DS:  # the writers need the grid only
        pass
    with rasterio.open(src) as ds0:
        ds = DS(); ds.width, ds.height, ds.crs = W, H, ds0.crs; ds.transform = ds0.transform
    cfg = PredictConfig(footprint_workers=workers)
    out = Path(tempfile.mkdtemp())
    outs = outputs_for(Path("banepa.tif"), out, parquet=True)
    rules = Calibrations(Calibration(0.5, Separation(0.5, 8.0), cfg.min_area_m2))
    w = SceneWriters(ds, outs, 0.13, cfg, lambda c, r: np.zeros(len(c), np.int32), rules)
    bw = BandWriter(w, W, rules)
    valid = np.ones((band_h, W), bool)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for r0 in range(0, H, band_h):
        h = min(band_h, H - r0)
        bw(Band(r0, prob[:, r0:r0 + h].copy(), valid[:h]))
    bw.finish()
    t1 = time.perf_counter()
    w.finish()
    print(f"bands and layers {t1 - t0:.1f} s, finishing (COG copies, GeoParquet) {time.perf_counter() - t1:.1f} s")
    pr.disable()
    dt = time.perf_counter() - t0
    print(f"{dt:.1f} s, {w.count} footprints, tiles(512/128)={((W-128)//384+1)*((H-128)//384+1)} -> {((W-128)//384+1)*((H-128)//384+1)/dt:.1f} tiles/s")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)

if __name__ == '__main__':
    main()
