from ccrk_ray.model.ccrk import CCRKModel, ModelConfig

__all__ = ["CCRKModel", "ModelConfig"]
