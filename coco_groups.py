"""The reference design's nine COCO super-groups (mask values 1..9 in this order) and their priorities."""

# Where two groups' objects overlap, the higher priority wins the pixel.
GROUP_PRIORITY = {
    "living": 4,
    "vehicles": 3,
    "urban": 2.5,
    "sports": 1.5,
    "personal": 1,
    "kitchen": 2,
    "fruit": 2,
    "household": 1,
    "electronics": 2.5,
}
GROUP_MEMBERS = {
    "living": ["person", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
    "vehicles": ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"],
    "urban": ["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"],
    "sports": [
        "frisbee",
        "skis",
        "snowboard",
        "sports ball",
        "kite",
        "baseball bat",
        "baseball glove",
        "skateboard",
        "surfboard",
        "tennis racket",
    ],
    "personal": ["backpack", "umbrella", "handbag", "tie", "suitcase"],
    "kitchen": ["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"],
    "fruit": ["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"],
    "household": [
        "chair",
        "couch",
        "potted plant",
        "bed",
        "dining table",
        "toilet",
        "sink",
        "refrigerator",
        "book",
        "clock",
        "vase",
        "scissors",
        "teddy bear",
        "hair drier",
        "toothbrush",
    ],
    "electronics": ["tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster"],
}
CATEGORY_GROUP = {name: group for group, names in GROUP_MEMBERS.items() for name in names}
