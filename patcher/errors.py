"""面向用户的错误：全部在这里，共一个基类 ``DsoptError``。

CLI 只捕获 ``DsoptError``：消息写明出了什么错、在哪里、怎么办，不打印 Python 回溯。
各类继承 ``ValueError``，与早期版本中各自定义时一致，捕获 ``ValueError`` 的调用方不受影响。
"""

from __future__ import annotations


class DsoptError(ValueError):
    """dsopt 能解释的错误（用户的输入、来源、输出或配方的问题）；消息写明原因与出路。"""


class RecipeError(DsoptError):
    """配方无效：消息逐条列出出错的键与原因。"""


class PlanError(DsoptError):
    """配方中的秩或预算不可能实现时抛出。"""


class LocateError(DsoptError):
    """模型结构中找不到某个需要的角色（消息写明层与角色）。"""


class SourceError(DsoptError):
    """来源无法解析或加载；消息写明原因与出路。"""


class OutputError(DsoptError):
    """输出目录不可用（已存在、不可写、磁盘已满）。"""


class DataError(DsoptError):
    """校准或评估文本不可用。"""


class ExportError(DsoptError):
    """模型无法按所选输出格式导出。"""


class ReportError(DsoptError):
    """输出目录中的保真度报告（fidelity.json）损坏或不完整。"""
