import pickle

import numpy as np
import pytest
from PIL import Image

from fedfms_jax.data import DataError, load_sites
from tests.data.conftest import make_fedfms_site, make_folders_site, square_mask, write_png

# --- FedFMS npy layout ------------------------------------------------------------------


def test_fedfms_layout_counts_shapes_and_scaled_labels(tmp_path):
    make_fedfms_site(tmp_path, "BIDMC", train=5, val=3)
    make_fedfms_site(tmp_path, "HK", train=2, val=None)
    sites = load_sites("fedfms", tmp_path)
    assert list(sites) == ["BIDMC", "HK"]
    assert (sites["BIDMC"].num_train, sites["BIDMC"].num_val) == (5, 3)
    record = sites["BIDMC"].train[0]
    assert record.image.shape == (32, 32, 3) and record.image.dtype == np.uint8
    assert record.mask.shape == (8, 8)  # FedFMS keeps labels at a quarter of the image
    assert (record.case_id, record.slice_index) == ("case0", 0)
    assert record.path.endswith("BIDMC/data_npy/case0_s0.npy")
    # A site without val_* folders gets a seeded split by case.
    assert sites["HK"].num_train + sites["HK"].num_val == 2 and sites["HK"].num_val == 1


def test_fedfms_two_channel_labels_need_num_classes_2(tmp_path):
    make_fedfms_site(tmp_path, "REFUGE", channels=2)
    sites = load_sites("fedfms", tmp_path, num_classes=2)
    assert sites["REFUGE"].train[0].mask.shape == (8, 8, 2)
    with pytest.raises(DataError, match=r"REFUGE/label_npy/case0_s0\.npy: mask has 2 channels"):
        load_sites("fedfms", tmp_path)


def test_fedfms_float_images_in_unit_range_are_scaled(tmp_path):
    make_fedfms_site(tmp_path, "s", train=1, val=None)
    path = tmp_path / "s" / "data_npy" / "case0_s0.npy"
    np.save(path, np.full((32, 32), 0.5, np.float32))  # grey float in [0, 1]
    image = load_sites("fedfms", tmp_path, val_fraction=0)["s"].train[0].image
    assert image.shape == (32, 32, 3) and np.all(image == 128)


def test_records_pickle_for_worker_processes(tmp_path):
    make_fedfms_site(tmp_path, "s", train=2)
    record = load_sites("fedfms", tmp_path)["s"].train[0]
    clone = pickle.loads(pickle.dumps(record))
    np.testing.assert_array_equal(clone.image, record.image)


# --- image folders ----------------------------------------------------------------------


def test_folders_layout_and_seeded_val_split(folders_root):
    sites = load_sites("folders", folders_root)
    assert list(sites) == ["site1", "site2"]
    assert (sites["site1"].num_train, sites["site1"].num_val) == (4, 2)
    assert sites["site2"].num_train + sites["site2"].num_val == 6 and sites["site2"].num_val == 1
    record = sites["site1"].train[1]
    assert record.image.shape == (16, 16, 3) and record.image.dtype == np.uint8
    np.testing.assert_array_equal(record.mask, square_mask(16, 3, 3, 5))  # 0/255 -> 0/1
    again = load_sites("folders", folders_root)
    assert [r.case_id for r in again["site2"].val] == [r.case_id for r in sites["site2"].val]


def test_folders_read_16_bit_rgb_jpeg_and_tiff(tmp_path):
    base = tmp_path / "s" / "images"
    grey16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200 + 3000)
    Image.fromarray(grey16).save(write_png(base / "a.png", np.zeros((1, 1), np.uint8)))
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(base / "b.jpg", quality=95)
    Image.fromarray(rgb).save(base / "c.tif")
    for stem in "abc":
        write_png(tmp_path / "s" / "masks" / f"{stem}.png", square_mask(16, 0, 0, 4))
    records = {r.case_id: r for r in load_sites("folders", tmp_path, val_fraction=0)["s"].train}
    assert sorted(records) == ["a", "b", "c"]
    a = records["a"].image
    assert a.dtype == np.uint8 and a[0, 0, 0] == 0 and a[-1, -1, 0] == 255  # windowed
    assert abs(int(records["b"].image[5, 5, 0]) - 200) <= 3  # lossy jpeg, still red
    np.testing.assert_array_equal(records["c"].image, rgb)


def test_flat_image_folders_and_palette_masks(tmp_path):
    """<site>/{images,masks} without train/val; a palette PNG mask holds label indices."""
    for i in range(5):
        write_png(tmp_path / "s" / "images" / f"p{i}_s{i % 2}.png",
                  np.full((8, 8, 3), 40 * i, np.uint8))
        mask = Image.fromarray(square_mask(8, 1, 1, 3, value=1 + i % 2)).convert("P")
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        (tmp_path / "s" / "masks").mkdir(exist_ok=True)
        mask.save(tmp_path / "s" / "masks" / f"p{i}_s{i % 2}.png")
    sites = load_sites("folders", tmp_path, num_classes=2, val_fraction=0.4)
    records = sites["s"].train + sites["s"].val
    assert len(records) == 5 and sites["s"].num_val == 2
    assert {r.case_id for r in records} == {f"p{i}" for i in range(5)}
    assert {int(r.mask.max()) for r in records} == {1, 2}


def test_site_selection_and_natural_order(tmp_path):
    for name in ("site10", "site2", "site1"):
        make_folders_site(tmp_path, name, train=2, val=1)
    assert list(load_sites("folders", tmp_path)) == ["site1", "site2", "site10"]
    assert list(load_sites("folders", tmp_path, sites=["site10", "site1"])) == ["site10", "site1"]
    with pytest.raises(DataError, match=r"site\(s\) \['site3'\] not found"):
        load_sites("folders", tmp_path, sites=["site3"])


# --- bad input: each gives an error naming the file, or is skipped with skip_bad ----------


def _bad(tmp_path, layout, match, **options):
    with pytest.raises(DataError, match=match):
        load_sites(layout, tmp_path, **options)
    return load_sites(layout, tmp_path, skip_bad=True, **options)


def test_missing_mask(folders_root):
    (folders_root / "site1" / "train" / "masks" / "case2.png").unlink()
    sites = _bad(folders_root, "folders",
                 r"site1/train/images/case2\.png: no mask for this image")
    assert sites["site1"].num_train == 3
    assert len(sites["site1"].skipped) == 1 and "case2.png" in sites["site1"].skipped[0].path


def test_mask_without_image(folders_root):
    (folders_root / "site1" / "val" / "images" / "case1.png").unlink()
    sites = _bad(folders_root, "folders", r"site1/val/masks/case1\.png: mask without an image")
    assert sites["site1"].num_val == 1


def test_shape_mismatch(folders_root):
    write_png(folders_root / "site2" / "train" / "masks" / "case4.png",
              np.zeros((12, 16), np.uint8))
    sites = _bad(folders_root, "folders",
                 r"site2/train/masks/case4\.png: mask shape \(12, 16\) does not match image "
                 r"shape \(16, 16, 3\)")
    assert sum(s.num_train + s.num_val for s in sites.values()) == 11


def test_corrupt_image_file(folders_root):
    (folders_root / "site1" / "train" / "images" / "case0.png").write_bytes(b"not a png")
    sites = _bad(folders_root, "folders",
                 r"site1/train/images/case0\.png: unreadable or corrupt image file")
    assert sites["site1"].num_train == 3


def test_truncated_image_file(folders_root):
    path = folders_root / "site1" / "train" / "images" / "case1.png"
    write_png(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    write_png(folders_root / "site1" / "train" / "masks" / "case1.png",
              np.zeros((64, 64), np.uint8))
    path.write_bytes(path.read_bytes()[:300])
    _bad(folders_root, "folders", r"case1\.png: unreadable or corrupt image file")


def test_corrupt_npy_file(tmp_path):
    make_fedfms_site(tmp_path, "s", train=3)
    path = tmp_path / "s" / "data_npy" / "case1_s1.npy"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    sites = _bad(tmp_path, "fedfms", r"s/data_npy/case1_s1\.npy: unreadable or corrupt \.npy")
    assert sites["s"].num_train == 2


def test_unexpected_label_values(folders_root):
    write_png(folders_root / "site1" / "train" / "masks" / "case3.png",
              square_mask(16, 0, 0, 4, value=7))
    sites = _bad(folders_root, "folders",
                 r"site1/train/masks/case3\.png: unexpected label values \[7\]")
    assert sites["site1"].num_train == 3
    # The same file is fine once its label is mapped.
    assert load_sites("folders", folders_root, label_map={7: 1, 255: 1})["site1"].num_train == 4


def test_colour_mask_is_refused(folders_root):
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[2:5, 2:5, 1] = 255
    write_png(folders_root / "site1" / "train" / "masks" / "case0.png", colour)
    _bad(folders_root, "folders", r"case0\.png: colour mask")


def test_empty_site(folders_root):
    (folders_root / "site3" / "train" / "images").mkdir(parents=True)
    (folders_root / "site3" / "train" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match=r"site3: empty site"):
        load_sites("folders", folders_root)
    with pytest.raises(DataError, match=r"site3: empty site"):
        load_sites("folders", folders_root, skip_bad=True)


def test_site_made_only_of_bad_files_is_empty(folders_root):
    for path in (folders_root / "site1" / "train" / "masks").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"site1: empty site: no training records found "
                                        r"\(4 bad inputs skipped\)"):
        load_sites("folders", folders_root, skip_bad=True)


def test_site_folder_of_the_wrong_layout(folders_root):
    with pytest.raises(DataError, match=r"site1: not a FedFMS site: no data_npy/"):
        load_sites("fedfms", folders_root)
    (folders_root / "notes").mkdir()
    with pytest.raises(DataError, match=r"notes: not an image-folder site"):
        load_sites("folders", folders_root)


def test_missing_root(tmp_path):
    for layout in ("fedfms", "folders", "nifti"):
        with pytest.raises(DataError, match=r"nowhere: data root does not exist"):
            load_sites(layout, tmp_path / "nowhere")
    with pytest.raises(DataError, match="no site folders"):
        load_sites("folders", tmp_path)


def test_layout_and_option_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        load_sites("dicom", tmp_path)
    with pytest.raises(ValueError, match="takes no root"):
        load_sites("synthetic", tmp_path)
    make_folders_site(tmp_path, "s")
    with pytest.raises(TypeError, match="keep_empty"):
        load_sites("folders", tmp_path, keep_empty=0.5)


def test_layout_options_table_is_what_the_readers_take():
    """readers.LAYOUT_OPTIONS (what the config validator allows in data.options) lists
    exactly each reader's keyword options, so neither can drift from the other."""
    import inspect

    from fedfms_jax.data import nifti, readers, synthetic

    takes = {"fedfms": readers.read_fedfms_site, "folders": readers.read_folders_site,
             "volumes": nifti.read_site, "nifti": nifti.read_site,
             "synthetic": synthetic.make_synthetic_sites}
    assert set(takes) == set(readers.LAYOUTS) == set(readers.LAYOUT_OPTIONS)
    handled = {"seed", "num_classes"}  # passed by load_sites itself
    for layout, reader in takes.items():
        keywords = {name for name, p in inspect.signature(reader).parameters.items()
                    if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty)} - handled
        assert keywords == set(readers.LAYOUT_OPTIONS[layout]), layout
