"""管线：阶段序列（run.py）与两个后端（memory.py、streaming.py），以及校准、探测、进度。"""
