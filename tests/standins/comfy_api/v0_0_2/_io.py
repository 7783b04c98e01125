"""The V3 node schema: typed inputs/outputs, ``Schema``, ``ComfyNode`` (with the classic V1 attributes ComfyUI
derives from the schema) and ``NodeOutput``. Behaviour of ComfyUI 0.3.64's ``comfy_api/latest/_io.py``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any


def _pruned(d: dict) -> dict:
    """``d`` without its None values (how every ``as_dict`` leaves unset options out)."""
    return {k: v for k, v in d.items() if v is not None}


class _classproperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, obj, owner):
        return self.getter(owner)


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class Input:
    """One input socket/widget; ``Parent`` is the type class it belongs to (it gives ``io_type``)."""

    Parent: type = None

    def __init__(
        self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None, extra_dict=None
    ):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}

    @property
    def io_type(self):
        return self.Parent.io_type

    def as_dict(self) -> dict:
        return _pruned(
            {"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip, "lazy": self.lazy}
        ) | _pruned(self.extra_dict)

    def get_io_type(self):
        return self.io_type


class WidgetInput(Input):
    def __init__(
        self,
        id: str,
        display_name: str = None,
        optional=False,
        tooltip: str = None,
        lazy: bool = None,
        default: Any = None,
        socketless: bool = None,
        widget_type: str = None,
        force_input: bool = None,
        extra_dict=None,
    ):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned(
            {
                "default": self.default,
                "socketless": self.socketless,
                "widgetType": self.widget_type,
                "forceInput": self.force_input,
            }
        )

    def get_io_type(self):
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output:
    Parent: type = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self):
        return self.Parent.io_type

    def as_dict(self) -> dict:
        return _pruned(
            {"display_name": self.display_name, "tooltip": self.tooltip, "is_output_list": self.is_output_list}
        )

    def get_io_type(self):
        return self.io_type


class ComfyTypeIO:
    """A type with default ``Input`` and ``Output`` classes."""

    io_type: str = None
    Type = Any
    Input = Input
    Output = Output


def comfytype(io_type: str):
    """Bind ``io_type`` to a type class and give it its own ``Input``/``Output`` subclasses pointing back at it."""

    def bind(cls):
        cls.io_type = io_type
        for name in ("Input", "Output"):
            nested = getattr(cls, name, None)
            if nested is not None:
                setattr(cls, name, type(nested.__name__, (nested,), {"Parent": cls, "__module__": cls.__module__}))
        return cls

    return bind


def Custom(io_type: str) -> type[ComfyTypeIO]:
    """A type for a custom ``io_type`` (a socket-only input/output)."""

    @comfytype(io_type)
    class CustomComfyType(ComfyTypeIO):
        pass

    return CustomComfyType


@comfytype("BOOLEAN")
class Boolean(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: bool = None,
            label_on: str = None,
            label_off: str = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self) -> dict:
            return super().as_dict() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


@comfytype("INT")
class Int(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: int = None,
            min: int = None,
            max: int = None,
            step: int = None,
            control_after_generate: bool = None,
            display_mode: NumberDisplay = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self) -> dict:
            return super().as_dict() | _pruned(
                {
                    "min": self.min,
                    "max": self.max,
                    "step": self.step,
                    "control_after_generate": self.control_after_generate,
                    "display": self.display_mode.value if self.display_mode else None,
                }
            )


@comfytype("FLOAT")
class Float(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: float = None,
            min: float = None,
            max: float = None,
            step: float = None,
            round: float = None,
            display_mode: NumberDisplay = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step, self.round = min, max, step, round
            self.display_mode = display_mode

        def as_dict(self) -> dict:
            # 0.3.64 puts the enum member itself (not its value) under "display" for FLOAT
            return super().as_dict() | _pruned(
                {"min": self.min, "max": self.max, "step": self.step, "round": self.round, "display": self.display_mode}
            )


@comfytype("STRING")
class String(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            multiline=False,
            placeholder: str = None,
            default: str = None,
            dynamic_prompts: bool = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self) -> dict:
            return super().as_dict() | _pruned(
                {"multiline": self.multiline, "placeholder": self.placeholder, "dynamicPrompts": self.dynamic_prompts}
            )


@comfytype("COMBO")
class Combo(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            options: list | type[Enum] = None,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: Any = None,
            control_after_generate: bool = None,
            upload: UploadType = None,
            image_folder: FolderType = None,
            remote=None,
            socketless: bool = None,
        ):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [member.value for member in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self) -> dict:
            return super().as_dict() | _pruned(
                {
                    "multiselect": self.multiselect,
                    "options": self.options,
                    "control_after_generate": self.control_after_generate,
                    **({self.upload.value: True} if self.upload is not None else {}),
                    "image_folder": self.image_folder.value if self.image_folder else None,
                    "remote": self.remote.as_dict() if self.remote else None,
                }
            )

    class Output(Output):
        def __init__(
            self,
            id: str = None,
            display_name: str = None,
            options: list = None,
            tooltip: str = None,
            is_output_list=False,
        ):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = options if options is not None else []

        @property
        def io_type(self):
            return self.options


def _socket_type(io_type: str, name: str) -> type[ComfyTypeIO]:
    return comfytype(io_type)(type(name, (ComfyTypeIO,), {"__module__": __name__}))


Image = _socket_type("IMAGE", "Image")
Mask = _socket_type("MASK", "Mask")
Latent = _socket_type("LATENT", "Latent")
Model = _socket_type("MODEL", "Model")
Vae = _socket_type("VAE", "Vae")
Clip = _socket_type("CLIP", "Clip")
UpscaleModel = _socket_type("UPSCALE_MODEL", "UpscaleModel")
Audio = _socket_type("AUDIO", "Audio")
Video = _socket_type("VIDEO", "Video")
AnyType = _socket_type("*", "AnyType")


class MultiType:
    """An input that takes any of several types. Its classic type is their ``io_type`` strings joined by commas,
    in order and without repeats (``"IMAGE,VIDEO"``); the executor accepts a link whose type shares one of them.
    Given an ``Input`` as ``id``, that input is kept (its options, its widget) and its type comes first."""

    Type = Any

    class Input(Input):
        def __init__(
            self,
            id: str | Input,
            types: list,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            extra_dict=None,
        ):
            self.input_override = None
            if isinstance(id, Input):
                self.input_override = copy.copy(id)
                optional = id.optional if id.optional is True else optional
                tooltip = id.tooltip if id.tooltip is not None else tooltip
                display_name = id.display_name if id.display_name is not None else display_name
                lazy = id.lazy if id.lazy is not None else lazy
                if isinstance(self.input_override, WidgetInput):
                    self.input_override.widget_type = self.input_override.get_io_type()
                id = id.id
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self._io_types = types

        @property
        def io_types(self) -> list[type]:
            """The permitted types as classes (an instance given in ``types`` counts as its class)."""
            return [kind if isinstance(kind, type) else type(kind) for kind in self._io_types]

        def get_io_type(self) -> str:
            names = [kind.io_type for kind in self.io_types]
            if self.input_override is not None:
                names.insert(0, self.input_override.get_io_type())
            return ",".join(dict.fromkeys(names))

        def as_dict(self) -> dict:
            own = super().as_dict()
            return self.input_override.as_dict() | own if self.input_override is not None else own


class Hidden(str, Enum):
    """Hidden inputs a node asks for; ``get_v1_info`` lists them as ``{member.name: (member.value,)}``."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """``cls.hidden`` during execution: the hidden values by name; any name not given reads as None."""

    def __init__(self, values: dict[Hidden, Any]):
        for member in Hidden:
            setattr(self, member.name, values.get(member))

    def __getattr__(self, key: str):
        return None

    @classmethod
    def from_dict(cls, d: dict | None) -> HiddenHolder:
        return cls(d or {})


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list[Input] = None
    outputs: list[Output] = None
    hidden: list[Hidden] = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        """Input ids and output ids must be unique, within each list and between the two."""
        input_ids = [i.id for i in self.inputs or []]
        output_ids = [o.id for o in self.outputs or []]
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(f"Input ids must be unique, but {input_ids} are not.")
        if len(set(output_ids)) != len(output_ids):
            issues.append(f"Output ids must be unique, but {output_ids} are not.")
        if set(input_ids) & set(output_ids):
            issues.append(
                f"Ids must be unique between inputs and outputs, but {set(input_ids) & set(output_ids)} are not."
            )
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        """Output nodes get the prompt and extra_pnginfo hidden inputs; outputs without an id get ``_<i>_<type>_``."""
        if self.is_api_node:
            self.hidden = self.hidden or []
            for member in (Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org):
                if member not in self.hidden:
                    self.hidden.append(member)
        if self.is_output_node:
            self.hidden = self.hidden or []
            for member in (Hidden.prompt, Hidden.extra_pnginfo):
                if member not in self.hidden:
                    self.hidden.append(member)
        for i, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def get_v1_info(self, cls) -> NodeInfoV1:
        inputs = {"required": {}}
        for i in self.inputs or []:
            options = i.as_dict()
            options.pop("optional", None)
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), options)
        for member in self.hidden or []:
            inputs.setdefault("hidden", {})[member.name] = (member.value,)
        outputs = self.outputs or []
        return NodeInfoV1(
            input=inputs,
            input_order={key: list(value) for key, value in inputs.items()},
            output=[o.io_type for o in outputs],
            output_is_list=[o.is_output_list for o in outputs],
            output_name=[o.display_name or o.io_type for o in outputs],
            output_tooltips=[o.tooltip or None for o in outputs],
            name=self.node_id,
            display_name=self.display_name,
            description=self.description,
            python_module=getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
            category=self.category,
            output_node=self.is_output_node,
            deprecated=self.is_deprecated,
            experimental=self.is_experimental,
            api_node=self.is_api_node,
        )


@dataclass
class NodeInfoV1:
    input: dict = None
    input_order: dict = None
    output: list = None
    output_is_list: list = None
    output_name: list = None
    output_tooltips: list = None
    name: str = None
    display_name: str = None
    description: str = None
    python_module: Any = None
    category: str = None
    output_node: bool = None
    deprecated: bool = None
    experimental: bool = None
    api_node: bool = None


class _UIOutput:
    def as_dict(self) -> dict:
        raise NotImplementedError


class NodeOutput:
    """A node's result: the output values in order, and optionally a ``ui`` payload for the frontend."""

    def __init__(self, *args: Any, ui: _UIOutput | dict = None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index) -> Any:
        return self.args[index]


class ComfyNode:
    """Base of every V3 node: override ``define_schema`` and ``execute`` (classmethods), optionally
    ``validate_inputs`` (V1 ``VALIDATE_INPUTS``) and ``fingerprint_inputs`` (V1 ``IS_CHANGED``)."""

    RELATIVE_PYTHON_MODULE = None
    SCHEMA = None
    hidden: HiddenHolder = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> Any:
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs) -> list[str]:
        return [name for name in kwargs if kwargs[name] is None]

    @classmethod
    def GET_BASE_CLASS(cls):
        return ComfyNode

    @classmethod
    def VALIDATE_CLASS(cls):
        for name in ("define_schema", "execute"):
            if getattr(cls, name).__func__ is getattr(ComfyNode, name).__func__:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")

    @_classproperty
    def FUNCTION(cls):
        return "EXECUTE_NORMALIZED"

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        returned = cls.execute(*args, **kwargs)
        if returned is None:
            returned = NodeOutput()
        elif isinstance(returned, tuple):
            returned = NodeOutput(*returned)
        elif not isinstance(returned, NodeOutput):
            raise Exception(f"Invalid return type from node: {type(returned)}")
        if returned.expand is not None and not cls.SCHEMA.enable_expand:
            raise Exception(f"Node {cls.__name__} is not expandable, but expand included in NodeOutput")
        return returned

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type[ComfyNode]:
        """A throw-away subclass with ``hidden`` filled in: what the executor calls ``execute`` and
        ``validate_inputs`` on."""
        clone = type(f"{cls.__name__}Clone", (cls,), {})
        clone.hidden = HiddenHolder.from_dict(hidden_inputs)
        return clone

    @classmethod
    def FINALIZE_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        cls.VALIDATE_CLASS()
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def INPUT_TYPES(cls, include_hidden=True, return_schema=False):
        schema = cls.FINALIZE_SCHEMA()
        inputs = schema.get_v1_info(cls).input
        if not include_hidden:
            inputs.pop("hidden", None)
        return (inputs, schema) if return_schema else inputs

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        from dataclasses import asdict

        return asdict(cls.GET_SCHEMA().get_v1_info(cls))

    # The classic attributes, derived from the schema (read-only class properties, as in ComfyUI)
    @_classproperty
    def DESCRIPTION(cls):
        return cls.GET_SCHEMA().description

    @_classproperty
    def CATEGORY(cls):
        return cls.GET_SCHEMA().category

    @_classproperty
    def OUTPUT_NODE(cls):
        return cls.GET_SCHEMA().is_output_node

    @_classproperty
    def NOT_IDEMPOTENT(cls):
        return cls.GET_SCHEMA().not_idempotent

    @_classproperty
    def INPUT_IS_LIST(cls):
        return cls.GET_SCHEMA().is_input_list

    @_classproperty
    def RETURN_TYPES(cls):
        return [o.io_type for o in cls.GET_SCHEMA().outputs or []]

    @_classproperty
    def RETURN_NAMES(cls):
        return [o.display_name or o.io_type for o in cls.GET_SCHEMA().outputs or []]

    @_classproperty
    def OUTPUT_IS_LIST(cls):
        return [o.is_output_list for o in cls.GET_SCHEMA().outputs or []]

    @_classproperty
    def OUTPUT_TOOLTIPS(cls):
        return [o.tooltip or None for o in cls.GET_SCHEMA().outputs or []]
