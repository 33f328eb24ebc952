"""FedFMS's four data sets (REFERENCE section 3) in the paper's settings: FedFMS npy layout,
inputs scaled to [0, 1], Adam 1e-4, BCE pos_weight 2, batch 4, one local epoch, 100 rounds,
evaluation every 5 rounds, one site held out as the unseen site.

The data root and the SAM weights come from the command line, e.g.
    python -m fedfms_jax.train --config configs/prostate_fedmsa.py --workdir runs/prostate \
        --config.data.root=/data/prostate --config.model.weights=sam_vit_b.safetensors
ViT-L (or ViT-H) is a matter of the weights file: the model is built from its metadata.
"""

from configs import base

DATASETS = {
    # FeTS2022 brain MRI, 2.5-D slices (i-1, i, i+1) as RGB, sites 1, 6, 18, 21.
    "fets": dict(sites="1,6,18,21", unseen_site="21", num_classes=1, label_map=""),
    # Multi-site prostate MRI; ISBI's labels {0,1,2} are merged into one foreground class
    # (FedFMS's code never binarised them).
    "prostate": dict(sites="BIDMC,HK,I2CVB,ISBI,ISBI_1.5,UCL", unseen_site="UCL",
                     num_classes=1, label_map="1:1,2:1"),
    # Fundus: optic disc rim and cup, two classes through the multi-class head.
    "fundus": dict(sites="REFUGE,ORIGA,G1020,Drishti-GS1", unseen_site="Drishti-GS1",
                   num_classes=2, label_map=""),
    # Nuclei from four sources.
    "nuclei": dict(sites="PanNuke,MoNuSAC2020,TNBC,MoNuSeg", unseen_site="MoNuSeg",
                   num_classes=1, label_map=""),
}


def config(dataset: str, mode: str):
    settings = DATASETS[dataset]
    c = base.get_config()
    c.mode = mode
    c.algorithm = "fedavg"
    c.rounds = 100
    c.model.weights = "sam_vit_b.safetensors"
    c.model.num_classes = settings["num_classes"]
    c.data.layout = "fedfms"
    c.data.root = ""  # required: --config.data.root=DIR
    c.data.sites = settings["sites"]
    c.data.unseen_site = settings["unseen_site"]
    c.data.label_map = settings["label_map"]
    c.data.normalise = "unit"
    c.data.batch_size = 4
    c.eval.every = 5
    return c
