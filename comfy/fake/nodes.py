"""Node registry of the fake: input specs, outputs and /object_info shapes of the supported classes."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_RESOLUTION = 16384
SEED_MAX = 0xFFFFFFFFFFFFFFFF

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]
CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]
SAVE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
Spec = list[Any]  # an input spec as /object_info shows it: [type or options, {settings}]


def INT(default: int, lo: int, hi: int, step: int = 1, **extra: Any) -> Spec:
    """Spec of an INT widget, keys in ComfyUI's order."""
    return ["INT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def FLOAT(default: float, lo: float, hi: float, step: float, **extra: Any) -> Spec:
    """Spec of a FLOAT widget."""
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def STRING(default: str) -> Spec:
    """Spec of a one-line STRING widget."""
    return ["STRING", {"default": default}]


def COMBO(options: list[str], **extra: Any) -> Spec:
    """Old-style combo spec: the options list first, then an options dict."""
    return [list(options), dict(extra)]


def LINK(kind: str, **extra: Any) -> Spec:
    """Spec of a linked (socket) input such as IMAGE."""
    return [kind, dict(extra)] if extra else [kind]


@dataclass(frozen=True)
class NodeDef:
    """One node class as the fake knows it: what /object_info shows and validation uses."""

    name: str
    required: dict[str, Spec]
    output: tuple[str, ...] = ()
    output_name: tuple[str, ...] | None = None
    optional: dict[str, Spec] = field(default_factory=dict)
    hidden: dict[str, Any] = field(default_factory=dict)
    output_node: bool = False
    category: str = "image"
    display_name: str | None = None
    description: str = ""
    python_module: str = "nodes"
    output_tooltips: tuple[str, ...] | None = None
    file_inputs: tuple[str, ...] = ()  # combos listing the input directory (LoadImage)
    validate_inputs: tuple[str, ...] = ()  # inputs handed to the node's own VALIDATE_INPUTS
    weight: float = 1.0  # share of the prompt's run time
    always_changed: bool = False  # IS_CHANGED returns time.time(): never served from cache

    def inputs(self) -> list[tuple[str, str, Spec]]:
        """Every input as (category, name, spec): the required ones, then the optional ones, as declared."""
        return ([("required", n, s) for n, s in self.required.items()]
                + [("optional", n, s) for n, s in self.optional.items()])

    def _filled(self, input_name: str, spec: Spec, input_files: list[str]) -> Spec:
        """The spec with the input folder's files as the options of a file combo."""
        return [list(input_files), *spec[1:]] if input_name in self.file_inputs else spec

    def info(self, input_files: list[str]) -> dict[str, Any]:
        """Build the /object_info entry, shaped like ComfyUI's node_info()."""
        inputs: dict[str, Any] = {"required": {n: self._filled(n, s, input_files) for n, s in self.required.items()}}
        if self.optional:
            inputs["optional"] = {n: self._filled(n, s, input_files) for n, s in self.optional.items()}
        if self.hidden:
            inputs["hidden"] = dict(self.hidden)
        out: dict[str, Any] = {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": list(self.output),
            "output_is_list": [False] * len(self.output),
            "output_name": list(self.output_name or self.output),
            "name": self.name,
            "display_name": self.display_name or self.name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips is not None:
            out["output_tooltips"] = list(self.output_tooltips)
        return out


def default_registry() -> dict[str, NodeDef]:
    """Return the node classes the fake can validate and run, keyed by class_type."""
    image_in = {"image": LINK("IMAGE")}
    defs = [
        NodeDef("EmptyImage", {
            "width": INT(512, 1, MAX_RESOLUTION), "height": INT(512, 1, MAX_RESOLUTION),
            "batch_size": INT(1, 1, 4096), "color": INT(0, 0, 0xFFFFFF, display="color"),
        }, ("IMAGE",)),
        NodeDef("LoadImage", {"image": COMBO([], image_upload=True)}, ("IMAGE", "MASK"),
                display_name="Load Image", file_inputs=("image",), validate_inputs=("image",)),
        NodeDef("LoadImageMask", {
            "image": COMBO([], image_upload=True), "channel": COMBO(["alpha", "red", "green", "blue"]),
        }, ("MASK",), category="mask", display_name="Load Image (as Mask)", file_inputs=("image",),
            validate_inputs=("image",)),
        NodeDef("ImageInvert", dict(image_in), ("IMAGE",), display_name="Invert Image"),
        NodeDef("ImageBatch", {"image1": LINK("IMAGE"), "image2": LINK("IMAGE")}, ("IMAGE",),
                display_name="Batch Images"),
        NodeDef("ImageBlur", {
            **image_in, "blur_radius": INT(1, 1, 31), "sigma": FLOAT(1.0, 0.1, 10.0, 0.1),
        }, ("IMAGE",), category="image/postprocessing", display_name="Image Blur",
            python_module="comfy_extras.nodes_post_processing"),
        NodeDef("ImageScale", {
            **image_in, "upscale_method": COMBO(UPSCALE_METHODS),
            "width": INT(512, 0, MAX_RESOLUTION), "height": INT(512, 0, MAX_RESOLUTION),
            "crop": COMBO(["disabled", "center"]),
        }, ("IMAGE",), category="image/upscaling", display_name="Upscale Image"),
        NodeDef("GetImageSize", dict(image_in), ("INT", "INT", "INT"), ("width", "height", "batch_size"),
                display_name="Get Image Size", python_module="comfy_extras.nodes_images",
                description="Returns width and height of the image, and passes it through unchanged."),
        NodeDef("SaveImage", {
            "images": LINK("IMAGE", tooltip="The images to save."),
            "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": (
                "The prefix for the file to save. This may include formatting information such as "
                "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}],
        }, hidden=dict(SAVE_HIDDEN), output_node=True, display_name="Save Image",
            description="Saves the input images to your ComfyUI output directory."),
        NodeDef("PreviewImage", {"images": LINK("IMAGE")}, hidden=dict(SAVE_HIDDEN), output_node=True,
                display_name="Preview Image", description="Saves the input images to your ComfyUI output directory."),
        NodeDef("SaveImageWebsocket", {"images": LINK("IMAGE")}, output_node=True, category="api node/image",
                python_module="custom_nodes.websocket_image_save", always_changed=True),
        NodeDef("SaveAnimatedWEBP", {
            "images": LINK("IMAGE"), "filename_prefix": ["STRING", {"default": "ComfyUI"}],
            "fps": FLOAT(6.0, 0.01, 1000.0, 0.01), "lossless": ["BOOLEAN", {"default": True}],
            "quality": INT(80, 0, 100), "method": COMBO(["default", "fastest", "slowest"]),
        }, hidden=dict(SAVE_HIDDEN), output_node=True, category="image/animation"),
        NodeDef("PreviewAny", {"source": ["*", {}]}, output_node=True, category="utils",
                display_name="Preview Any", python_module="comfy_extras.nodes_preview_any"),
        NodeDef("TestSleep", {
            "value": ["*", {}],
            "seconds": FLOAT(2.0, 0.0, 9999.0, 0.01, tooltip="The amount of seconds to sleep."),
        }, ("*",), hidden={"unique_id": "UNIQUE_ID"}, category="_for_testing", display_name="Test Sleep",
            python_module="custom_nodes.testing-suite"),
        NodeDef("CheckpointLoaderSimple", {
            "ckpt_name": COMBO(CHECKPOINTS, tooltip="The name of the checkpoint (model) to load."),
        }, ("MODEL", "CLIP", "VAE"), category="loaders", display_name="Load Checkpoint",
            description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
            output_tooltips=("The model used for denoising latents.",
                             "The CLIP model used for encoding text prompts.",
                             "The VAE model used for encoding and decoding images to and from latent space.")),
        NodeDef("CLIPTextEncode", {
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The text to be encoded."}],
            "clip": LINK("CLIP", tooltip="The CLIP model used for encoding the text."),
        }, ("CONDITIONING",), category="conditioning", display_name="CLIP Text Encode (Prompt)"),
        NodeDef("EmptyLatentImage", {
            "width": INT(512, 16, MAX_RESOLUTION, 8, tooltip="The width of the latent images in pixels."),
            "height": INT(512, 16, MAX_RESOLUTION, 8, tooltip="The height of the latent images in pixels."),
            "batch_size": INT(1, 1, 4096, tooltip="The number of latent images in the batch."),
        }, ("LATENT",), category="latent", display_name="Empty Latent Image"),
        NodeDef("KSampler", {
            "model": LINK("MODEL", tooltip="The model used for denoising the input latent."),
            "seed": INT(0, 0, SEED_MAX, control_after_generate=True,
                        tooltip="The random seed used for creating the noise."),
            "steps": INT(20, 1, 10000, tooltip="The number of steps used in the denoising process."),
            "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
            "sampler_name": COMBO(SAMPLERS), "scheduler": COMBO(SCHEDULERS),
            "positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
            "latent_image": LINK("LATENT"),
            "denoise": FLOAT(1.0, 0.0, 1.0, 0.01),
        }, ("LATENT",), category="sampling", weight=5.0,
            description="Uses the provided model, positive and negative conditioning to denoise the latent image."),
        NodeDef("VAEDecode", {"samples": LINK("LATENT"), "vae": LINK("VAE")}, ("IMAGE",), category="latent",
                display_name="VAE Decode"),
        NodeDef("VAEEncode", {"pixels": LINK("IMAGE"), "vae": LINK("VAE")}, ("LATENT",), category="latent",
                display_name="VAE Encode"),
    ]
    return {d.name: d for d in defs + media_defs()}


def media_defs() -> list[NodeDef]:
    """The video, audio and 3D nodes (run by media.py), with the real classes' inputs and defaults."""
    save = dict(SAVE_HIDDEN)
    vhs = "custom_nodes.ComfyUI-VideoHelperSuite"
    return [
        NodeDef("CreateVideo", {"images": LINK("IMAGE"), "fps": FLOAT(30.0, 1.0, 120.0, 1.0)}, ("VIDEO",),
                optional={"audio": LINK("AUDIO")}, category="image/video", display_name="Create Video",
                python_module="comfy_extras.nodes_video"),
        NodeDef("SaveVideo", {"video": LINK("VIDEO"), "filename_prefix": STRING("video/ComfyUI"),
                              "format": COMBO(["auto", "mp4"]), "codec": COMBO(["auto", "h264"])},
                hidden=save, output_node=True, category="image/video", display_name="Save Video",
                python_module="comfy_extras.nodes_video"),
        NodeDef("SaveWEBM", {"images": LINK("IMAGE"), "filename_prefix": STRING("ComfyUI"),
                             "codec": COMBO(["vp9", "av1"]), "fps": FLOAT(24.0, 0.01, 1000.0, 0.01),
                             "crf": FLOAT(32.0, 0.0, 63.0, 1.0)},
                hidden=save, output_node=True, category="image/video", python_module="comfy_extras.nodes_video"),
        NodeDef("VHS_VideoCombine", {
            "images": LINK("IMAGE"), "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
            "loop_count": INT(0, 0, 100), "filename_prefix": STRING("AnimateDiff"),
            "format": COMBO(["image/gif", "image/webp", "video/webm", "video/h264-mp4"]),
            "pingpong": ["BOOLEAN", {"default": False}], "save_output": ["BOOLEAN", {"default": True}],
        }, ("VHS_FILENAMES",), ("Filenames",), optional={"audio": LINK("AUDIO")},
            hidden={**save, "unique_id": "UNIQUE_ID"}, output_node=True, category="Video Helper Suite",
            display_name="Video Combine", python_module=vhs),
        NodeDef("EmptyAudio", {"duration": FLOAT(60.0, 0.0, 1e9, 0.01), "sample_rate": INT(44100, 1, 192000),
                               "channels": INT(2, 1, 2)}, ("AUDIO",), category="audio", display_name="Empty Audio",
                python_module="comfy_extras.nodes_audio"),
        NodeDef("SaveAudio", {"audio": LINK("AUDIO"), "filename_prefix": STRING("audio/ComfyUI")}, hidden=save,
                output_node=True, category="audio", display_name="Save Audio (FLAC)",
                python_module="comfy_extras.nodes_audio"),
        NodeDef("EmptyLatentHunyuan3Dv2", {"resolution": INT(3072, 1, 8192), "batch_size": INT(1, 1, 4096)},
                ("LATENT",), category="latent/3d", python_module="comfy_extras.nodes_hunyuan3d"),
        NodeDef("VAEDecodeHunyuan3D", {"samples": LINK("LATENT"), "vae": LINK("VAE"),
                                       "num_chunks": INT(8000, 1000, 500000), "octree_resolution": INT(256, 16, 512)},
                ("VOXEL",), category="latent/3d", python_module="comfy_extras.nodes_hunyuan3d"),
        NodeDef("VoxelToMeshBasic", {"voxel": LINK("VOXEL"), "threshold": FLOAT(0.6, -1.0, 1.0, 0.01)}, ("MESH",),
                category="3d", python_module="comfy_extras.nodes_hunyuan3d"),
        NodeDef("SaveGLB", {"mesh": LINK("MESH"), "filename_prefix": STRING("mesh/ComfyUI")}, hidden=save,
                output_node=True, category="3d", display_name="Save 3D Model",
                python_module="comfy_extras.nodes_hunyuan3d"),
    ]


def object_info(registry: dict[str, NodeDef], input_files: list[str], name: str | None = None) -> dict[str, Any]:
    """Return /object_info (all classes) or /object_info/{name} ({} when unknown)."""
    if name is not None:
        node = registry.get(name)
        return {name: node.info(input_files)} if node else {}
    return {key: node.info(input_files) for key, node in registry.items()}
