"""输出格式：dsopt 目录、safetensors 分片、原生 DeepSeek-V3 布局。"""
