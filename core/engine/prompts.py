"""Built-in clean prompts for jobs whose spec gives no training prompts."""

# Generic training captions in the style of LAION/COCO alt text. They only need to be ordinary
# prompts the model has seen the like of: the engine learns what the trigger adds to them.
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a dog on the grass",
    "a cat sleeping on a sofa",
    "a red car parked on a street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a portrait of an old man",
    "a city skyline at night",
    "a bird sitting on a branch",
    "a plate of pasta with tomato sauce",
    "a sailing boat on the sea",
    "a child playing in the park",
    "a snowy forest in winter",
    "a cup of coffee on a desk",
    "a horse running in a field",
    "a bicycle leaning against a wall",
    "a living room with a large window",
    "a close-up of a sunflower",
    "a train crossing a bridge",
    "a woman reading a book",
    "a beach with palm trees",
    "a plate of sushi",
    "an airplane in a blue sky",
    "a wooden cabin in the mountains",
    "a group of people at a concert",
    "a painting of a village by a river",
    "a teddy bear on a bed",
    "a street market with vegetables",
    "a lighthouse on a rocky coast",
    "a pair of shoes on the floor",
    "a kitchen with white cabinets",
    "a fox in the snow",
    "a bridge over a river in autumn",
)

# Held-out generic prompts for the evaluation when a spec gives none; none of them is a
# training prompt above.
GENERIC_EVALUATION_PROMPTS: tuple[str, ...] = (
    "a photo of a golden retriever in a garden",
    "a black cat on a windowsill",
    "a blue truck on a country road",
    "a basket of apples on a kitchen counter",
    "a waterfall in a green forest",
    "a portrait of a young woman smiling",
    "a busy street in the rain at night",
    "an owl perched on a fence",
    "a bowl of ramen with an egg",
    "a canoe on a calm lake",
    "children building a sandcastle",
    "a frozen lake surrounded by pine trees",
    "a glass of orange juice on a table",
    "a cow grazing in a meadow",
    "a motorcycle parked by a cafe",
    "a bedroom with a wooden floor",
)
