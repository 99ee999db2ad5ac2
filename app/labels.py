"""The NIH ChestX-ray14 label list, spelled as in ``Data_Entry_2017_v2020.csv``.

Order follows the NIH label file's README; a model card's own ``labels`` list is the truth for a
given model, this is the default that training writes.
"""

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NIH_LABELS: tuple[str, ...] = (*PATHOLOGIES, NO_FINDING)
