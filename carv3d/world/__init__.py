"""The procedural world of the embedded teacher: objects, their ground-truth renders and prompts.

    from carv3d.world import render_world, parse_prompt, reference_cameras
    p = parse_prompt("a red house, front view")              # WorldPrompt("red", "house", "front")
    gt = render_world(p.object, p.colour, reference_cameras("front"), 32, 32, supersample=2)
    gt.rgb, gt.mask                                          # (1, 3, 32, 32), (1, 1, 32, 32)

Objects are analytic SDFs in carv3d's canonical pose (+Y up, front towards +Z), see
:mod:`carv3d.world.objects`; the renderer is :mod:`carv3d.world.raytrace`; the prompt grammar and
vocabulary are in :mod:`carv3d.world.prompts`. The world needs only torch (and carv3d's camera, ray
and shading modules); nothing here imports diffusers.
"""

from carv3d.world.objects import (
    COLOUR_NAMES,
    COLOURS,
    OBJECT_NAMES,
    OBJECT_RADIUS,
    OBJECTS,
    ObjectKind,
    colour_rgb,
)
from carv3d.world.prompts import WorldPrompt, format_prompt, parse_prompt, tokenizer_words, vocabulary
from carv3d.world.raytrace import (
    AMBIENT,
    LIGHT_DIRECTION,
    VIEW_PROBABILITIES,
    MaterialRender,
    WorldCameraRanges,
    WorldRender,
    compose_rgb,
    reference_cameras,
    render_materials,
    render_world,
    sample_world_cameras,
)

__all__ = [
    "AMBIENT",
    "COLOURS",
    "COLOUR_NAMES",
    "LIGHT_DIRECTION",
    "MaterialRender",
    "OBJECTS",
    "OBJECT_NAMES",
    "OBJECT_RADIUS",
    "ObjectKind",
    "VIEW_PROBABILITIES",
    "WorldCameraRanges",
    "WorldPrompt",
    "WorldRender",
    "colour_rgb",
    "compose_rgb",
    "format_prompt",
    "parse_prompt",
    "reference_cameras",
    "render_materials",
    "render_world",
    "sample_world_cameras",
    "tokenizer_words",
    "vocabulary",
]
