import json
import os

import pytest

from hqod.data.voc import VOC_CLASSES, convert_voc_to_coco

XML = """<annotation><filename>{name}.jpg</filename>
<size><width>200</width><height>100</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = """<object><name>{cls}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def _write_voc(root, year, image_set, images):
    os.makedirs(os.path.join(root, year, "ImageSets", "Main"), exist_ok=True)
    os.makedirs(os.path.join(root, year, "Annotations"), exist_ok=True)
    with open(os.path.join(root, year, "ImageSets", "Main", f"{image_set}.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    for name, objs in images.items():
        body = "".join(OBJ.format(**o) for o in objs)
        with open(os.path.join(root, year, "Annotations", f"{name}.xml"), "w") as f:
            f.write(XML.format(name=name, objects=body))


def test_voc_to_coco(tmp_path):
    root = str(tmp_path / "VOCdevkit")
    _write_voc(root, "VOC2007", "trainval", {
        "000005": [dict(cls="chair", difficult=0, x0=11, y0=21, x1=50, y1=80),
                   dict(cls="person", difficult=1, x0=1, y0=1, x1=200, y1=100)],
    })  # fmt: skip
    _write_voc(root, "VOC2012", "trainval", {
        "2008_000001": [dict(cls="tvmonitor", difficult=0, x0=101, y0=1, x1=110, y1=10)],
    })  # fmt: skip
    out = str(tmp_path / "out" / "voc.json")
    n_img, n_box = convert_voc_to_coco(root, [("VOC2007", "trainval"), ("VOC2012", "trainval")], out)
    assert (n_img, n_box) == (2, 3)
    coco = json.load(open(out))
    assert [c["name"] for c in coco["categories"]] == VOC_CLASSES
    assert coco["images"][0] == {
        "id": 1, "file_name": "VOC2007/JPEGImages/000005.jpg", "width": 200, "height": 100
    }
    chair, person, tv = coco["annotations"]
    # 1-based inclusive VOC pixel indices -> 0-based COCO [x, y, w, h]
    assert chair["bbox"] == [10.0, 20.0, 40.0, 60.0] and chair["area"] == 2400.0
    assert chair["category_id"] == VOC_CLASSES.index("chair") + 1 and chair["iscrowd"] == 0
    assert person["iscrowd"] == 1  # difficult
    assert tv["image_id"] == 2 and tv["bbox"] == [100.0, 0.0, 10.0, 10.0]

    from pycocotools.coco import COCO

    assert len(COCO(out).getAnnIds()) == 3


def test_voc_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        convert_voc_to_coco(str(tmp_path), [("VOC2007", "test")], str(tmp_path / "x.json"))
