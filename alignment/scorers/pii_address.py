"""Study A's address detector for scrubadub: street addresses found by pyap alone.

scrubadub's own `scrubadub_address` cross-checks pyap's finds with libpostal, a C library built from source with
a 2 GB model. Study A's PII scorer left that check out and kept pyap's regular expressions only (US, GB and CA
addresses); this module does the same. Imported only when the `address` detector is asked for (it needs pyap).
"""

from __future__ import annotations

import re

import pyap
from scrubadub.detectors.base import Detector
from scrubadub.filth.address import AddressFilth


class PyapAddressDetector(Detector):
    """Every occurrence in the text of an address pyap parses, as one `AddressFilth`."""

    filth_cls = AddressFilth
    name = "address"

    @classmethod
    def supported_locale(cls, locale: str) -> bool:
        return cls.locale_split(locale)[1] in ("US", "GB", "CA")

    def iter_filth(self, text, document_name=None):
        for address in pyap.parse(text, country=self.region):
            for match in re.finditer(_pattern(address.full_address), text):
                yield AddressFilth(beg=match.start(), end=match.end(), text=match.group(), detector_name=self.name,
                                   document_name=document_name, locale=self.locale)


def _pattern(full_address: str) -> str:
    # pyap returns the address normalised (parts joined by ", " or " ", dashes unified), so look for its words
    # separated by any run of spaces, commas and newlines, with any kind of dash inside them.
    words = [re.escape(word).replace(r"\-", "[-‐‑‒–—―]") for word in re.split(r"[\s,]+", full_address) if word]
    return r"(?<!\w)" + r"[\s,]+".join(words) + r"(?!\w)"  # whole words, even where the address ends in "."
