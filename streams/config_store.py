"""What a worker knows of campaigns, templates and channels: materialised from loopcast.config.

Pure: records go in, indexes come out. The worker feeds it from the compacted topic.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from pydantic import ValidationError

from schemas.codec import DecodeError
from schemas.config import Campaign, Channel, Document, SegmentDocument, TagRule, Template, parse_document
from schemas.contracts import codec
from schemas.models import ConfigRecord
from streams.segments import max_window, referenced_events


class ConfigStore:
    def __init__(self) -> None:
        self.documents: dict[str, Document] = {}
        self.by_trigger: dict[str, list[Campaign]] = {}
        self.by_conversion: dict[str, list[Campaign]] = {}
        self.tag_rules: dict[str, list[TagRule]] = {}
        # Event types the active segments count, with the longest window each is looked back over.
        self.event_windows: dict[str, timedelta] = {}
        self.errors: list[str] = []

    def apply(self, key: str, value: bytes | None) -> None:
        """Apply one record of the config topic; a null value deletes the key."""
        if value is None:
            self.documents.pop(key, None)
        else:
            try:
                document = parse_document(codec(ConfigRecord).decode(value))
            except (DecodeError, ValidationError) as exc:
                # A bad document must not take the worker down; the previous version stays.
                self.errors.append(f"{key}: {exc}")
                return
            self.documents[document.key] = document
        self._reindex()

    def put(self, document: Document) -> None:
        self.documents[document.key] = document
        self._reindex()

    def _reindex(self) -> None:
        by_trigger: dict[str, list[Campaign]] = defaultdict(list)
        by_conversion: dict[str, list[Campaign]] = defaultdict(list)
        tag_rules: dict[str, list[TagRule]] = defaultdict(list)
        windows: dict[str, timedelta] = {}
        for document in self.documents.values():
            if isinstance(document, Campaign) and document.status == "active":
                by_trigger[document.trigger.event_type].append(document)
                if document.conversion_event:
                    by_conversion[document.conversion_event].append(document)
            elif isinstance(document, TagRule):
                tag_rules[document.event_type].append(document)
            elif isinstance(document, SegmentDocument) and document.status == "active":
                window = max_window(document.root)
                for event_type in referenced_events(document.root):
                    windows[event_type] = max(windows.get(event_type, window), window)
        for rules in tag_rules.values():
            rules.sort(key=lambda r: r.id)  # a stable order: the last rule wins per tag
        self.by_trigger, self.by_conversion = dict(by_trigger), dict(by_conversion)
        self.tag_rules, self.event_windows = dict(tag_rules), windows

    def campaign(self, campaign_id: str) -> Campaign | None:
        doc = self.documents.get(f"campaign:{campaign_id}")
        return doc if isinstance(doc, Campaign) else None

    def template(self, template_id: str) -> Template | None:
        doc = self.documents.get(f"template:{template_id}")
        return doc if isinstance(doc, Template) else None

    def segment(self, segment_id: str) -> SegmentDocument | None:
        doc = self.documents.get(f"segment:{segment_id}")
        return doc if isinstance(doc, SegmentDocument) else None

    def channel(self, channel_id: str) -> Channel | None:
        doc = self.documents.get(f"channel:{channel_id}")
        return doc if isinstance(doc, Channel) else None
