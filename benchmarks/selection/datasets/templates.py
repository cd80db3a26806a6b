"""Caption templates and vocabularies (class names, caption nouns, region words) of the
selection datasets."""
from __future__ import annotations

# --------------------------------------------------------------------------------------
# general domain sources
# --------------------------------------------------------------------------------------

TUX_CLASSES = {"animals": "animal", "clothes": "piece of clothing", "food": "food", "plants": "plant",
               "vehicles": "vehicle", "sports": "piece of sports equipment", "household": "household object",
               "space": "space object"}
OPENCLIPART_CLASSES = {"animals": "animal", "buildings": "building", "computer": "computer icon",
                       "food": "food", "geography": "map", "people": "person", "plants": "plant",
                       "tools": "tool", "transportation": "transportation sign or vehicle",
                       "shapes": "geometric shape", "signs_and_symbols": "sign or symbol",
                       "electronics": "electronic component", "office": "office item"}
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
# the sheet captions' noun per Animal-MNIST class (one each: a silhouette shows no age or breed, so "kitten" or
# "grizzly" would not be true of the pixels)
ANIMAL_NOUNS = [[c] for c in ANIMAL_CLASSES]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMOJI_CLASSES = ["flag", "face", "heart", "hand", "clock", "keycap", "button"]

TUX_NP_TEMPLATES = ["{np}.", "a cartoon drawing of {np}", "clip art of {np}", "a colorful illustration of {np}",
                    "a children's paint program stamp of {np}"]
TUX_SENTENCE_TEMPLATES = ["{s}", "cartoon drawing: {s}", "illustration with the description \"{s}\""]
OPENCLIPART_TEMPLATES = ["clip art of {np}", "{np}, vector illustration", "a simple drawing of {np}",
                         "{cat} clip art: {w}", "an illustration of {np} from the {cat} category"]
EMOJI_TEMPLATES = ["an emoji of {np}", "{w} emoji", "a colorful icon of {np}", "the {w} emoji",
                   "a small cartoon picture of {np}"]
FLAG_TEMPLATES = ["an emoji of the flag of {w}", "flag of {w} emoji", "the national flag of {w}, as an emoji"]
ANIMAL_TEMPLATES = ["a silhouette of {np}", "a white silhouette of {np} on a black background",
                    "{w} silhouette", "the shape of {np}", "a low-resolution outline image of {np}"]
MNIST_TEMPLATES = ["a handwritten digit {d}", "the number {word} written by hand", "a handwritten {d}",
                   "a white-on-black scan of a handwritten digit {word}", "digit {d}, handwritten"]
GENERAL_ZS_TEMPLATES = {
    "general_tuxpaint": ["a cartoon drawing of a {c}.", "clip art of a {c}.", "a stamp picture of a {c}."],
    "general_openclipart": ["clip art of a {c}.", "a vector illustration of a {c}.", "a drawing of a {c}."],
    "general_emoji": ["an emoji of a {c}.", "a {c} emoji.", "a colorful icon of a {c}."],
    "general_animals": ["a silhouette of a {c}.", "a white silhouette of a {c} on a black background.",
                        "the shape of a {c}."],
    "general_mnist": ["a handwritten digit {c}.", "the number {c} written by hand.", "a handwritten {c}."],
}


# --------------------------------------------------------------------------------------
# target A: Fashion-MNIST
# --------------------------------------------------------------------------------------

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
# caption nouns per class (a synonym is drawn per caption)
FASHION_NOUNS = [["t-shirt", "top", "tee", "short-sleeved top"], ["pair of trousers", "pair of pants", "trousers"],
                 ["pullover", "sweater", "jumper"], ["dress", "summer dress"], ["coat", "winter coat", "overcoat"],
                 ["sandal", "pair of sandals", "summer sandal"], ["shirt", "button-up shirt", "long-sleeved shirt"],
                 ["sneaker", "trainer", "sports shoe"], ["bag", "handbag", "tote bag"], ["ankle boot", "boot"]]
FASHION_ATTRS = ["casual", "classic", "simple", "stylish", "everyday", "new", "basic", "women's", "men's", "plain"]
FASHION_TEMPLATES = [
    "a product photo of {np}",
    "catalogue image: {n}",
    "grayscale picture of {np} on a plain background",
    "{np}, studio shot",
    "online shop thumbnail of {np}",
    "a low-resolution photo of {np}",
    "{n} for sale",
    "fashion item: {n}",
    "a small black and white image of {np}",
    "this is {np} from a clothing catalogue",
]
FASHION_ZS_TEMPLATES = ["a photo of a {c}.", "a product photo of a {c}.", "a grayscale catalogue image of a {c}.",
                        "a low-resolution photo of the {c}."]


# --------------------------------------------------------------------------------------
# target B: medical (brain MRI + head CT + DICOM frames)
# --------------------------------------------------------------------------------------

PLANES = ("axial", "coronal", "sagittal")
MED_CLASSES_ALL = [f"{p} brain MRI" for p in PLANES] + [f"{p} head CT" for p in PLANES]

AAL_WORDS = {
    "Precentral": "precentral gyrus", "Postcentral": "postcentral gyrus",
    "Frontal_Sup": "superior frontal gyrus", "Frontal_Sup_Orb": "orbital superior frontal gyrus",
    "Frontal_Mid": "middle frontal gyrus", "Frontal_Mid_Orb": "orbital middle frontal gyrus",
    "Frontal_Inf_Oper": "inferior frontal gyrus (opercular part)",
    "Frontal_Inf_Tri": "inferior frontal gyrus (triangular part)",
    "Frontal_Inf_Orb": "inferior frontal gyrus (orbital part)", "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area", "Olfactory": "olfactory cortex",
    "Frontal_Sup_Medial": "medial superior frontal gyrus", "Frontal_Med_Orb": "medial orbitofrontal cortex",
    "Rectus": "gyrus rectus", "Insula": "insula", "Cingulum_Ant": "anterior cingulate gyrus",
    "Cingulum_Mid": "middle cingulate gyrus", "Cingulum_Post": "posterior cingulate gyrus",
    "Hippocampus": "hippocampus", "ParaHippocampal": "parahippocampal gyrus", "Amygdala": "amygdala",
    "Calcarine": "calcarine cortex", "Cuneus": "cuneus", "Lingual": "lingual gyrus",
    "Occipital_Sup": "superior occipital gyrus", "Occipital_Mid": "middle occipital gyrus",
    "Occipital_Inf": "inferior occipital gyrus", "Fusiform": "fusiform gyrus",
    "Parietal_Sup": "superior parietal lobule", "Parietal_Inf": "inferior parietal lobule",
    "SupraMarginal": "supramarginal gyrus", "Angular": "angular gyrus", "Precuneus": "precuneus",
    "Paracentral_Lobule": "paracentral lobule", "Caudate": "caudate nucleus", "Putamen": "putamen",
    "Pallidum": "globus pallidus", "Thalamus": "thalamus", "Heschl": "Heschl's gyrus",
    "Temporal_Sup": "superior temporal gyrus", "Temporal_Pole_Sup": "superior temporal pole",
    "Temporal_Mid": "middle temporal gyrus", "Temporal_Pole_Mid": "middle temporal pole",
    "Temporal_Inf": "inferior temporal gyrus",
}

MED_POSITION_WORDS = {
    "axial": ["near the skull base", "at a low level", "at mid level", "at a high level", "near the vertex"],
    "coronal": ["through the back of the head", "posterior", "through the middle of the head", "anterior",
                "through the front of the head"],
    "sagittal": ["lateral, through the left side", "left of midline", "near the midline", "right of midline",
                 "lateral, through the right side"],
}
MRI_TEMPLATES = [
    "{plane} {mod} slice of the brain showing {regions}",
    "{plane} {mod} of the brain at the level of the {regions}",
    "brain {mod}, {plane} view, through the {regions}",
    "{plane} section of a {mod} image of the head including {regions}",
    "{mod} of the brain ({plane}) with the {regions} visible",
]
MRI_NOREGION_TEMPLATES = ["{plane} {mod} slice of the head, {where}", "brain {mod}, {plane} view, {where}",
                          "{plane} section of a {mod} image of the head, {where}"]
MACAQUE_TEMPLATES = ["{plane} T1 MRI slice of a macaque monkey brain, {where}",
                     "rhesus macaque brain MRI, {plane} view, {where}",
                     "{plane} section of a T1-weighted MR template of the monkey brain"]
CT_TEMPLATES = ["{plane} CT slice of the head, {window}, {where}", "non-contrast head CT, {plane} view, {window}",
                "{plane} computed tomography image of the skull and brain, {where}",
                "CT scan of the head ({plane}) in {window}", "{plane} head CT, {where}, {window}"]
DICOM_TEMPLATES = ["{plane} {mod} image{of}", "{mod} scan{of}, {plane} slice", "a DICOM {mod} frame{of}, {plane}"]
MED_ZS_TEMPLATES = ["a {c} image.", "a {c} slice.", "a medical scan: {c}.", "a grayscale {c} scan of a patient."]
