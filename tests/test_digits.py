import filecmp
import json
import os

from pycocotools.coco import COCO

from hqod.data import DIGITS_CLASSES, DigitsSpec, generate_digits

SPEC = DigitsSpec(num_train=60, num_val=12, seed=5)


def test_generator_is_deterministic_and_independent_of_workers(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate_digits(a, SPEC)
    from hqod.data.digits import generate_split

    generate_split(b, "train", SPEC, num_workers=1)
    generate_split(b, "val", SPEC, num_workers=1)
    for split in ("train", "val"):
        ja = os.path.join(a, "annotations", f"instances_{split}.json")
        jb = os.path.join(b, "annotations", f"instances_{split}.json")
        assert filecmp.cmp(ja, jb, shallow=False)
        names = sorted(os.listdir(os.path.join(a, split)))
        assert len(names) == {"train": 60, "val": 12}[split]
        for n in names[:10]:
            assert filecmp.cmp(os.path.join(a, split, n), os.path.join(b, split, n), shallow=False)


def test_pycocotools_loads_the_json_and_sizes_span_coco_areas(tiny_digits):
    generate_root = str(tiny_digits)
    coco = COCO(os.path.join(generate_root, "annotations", "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == DIGITS_CLASSES
    assert len(coco.getImgIds()) == 48
    anns = coco.loadAnns(coco.getAnnIds())
    assert 3 * 48 * 0.6 <= len(anns) <= 9 * 48  # 3-9 digits per scene, a few fully hidden
    for a in anns:
        img = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert a["area"] == w * h and a["iscrowd"] == 0
    areas = [a["area"] for a in anns]
    small = sum(ar < 32**2 for ar in areas) / len(areas)
    large = sum(ar > 96**2 for ar in areas) / len(areas)
    assert 0.2 < small < 0.6  # COCO-style mix; large ones are rare in 128-160 px scenes
    assert large < 0.2


def test_full_size_scenes_have_all_coco_area_ranges(tmp_path):
    from hqod.data.digits import generate_split

    json_file = generate_split(str(tmp_path), "val", DigitsSpec(num_val=40), num_workers=1)
    anns = json.load(open(json_file))["annotations"]
    areas = [a["area"] for a in anns]
    shares = [
        sum(ar < 32**2 for ar in areas),
        sum(32**2 <= ar <= 96**2 for ar in areas),
        sum(ar > 96**2 for ar in areas),
    ]
    assert all(s / len(areas) > 0.15 for s in shares), shares
    # Train and val scenes draw their digits from disjoint sample pools.
    from hqod.data.digits import _digit_pools

    _, _, pools = _digit_pools()
    assert not set(pools["train"]) & set(pools["val"])
