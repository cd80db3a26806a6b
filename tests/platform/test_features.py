"""The featurize run's stored artefacts: the bank (with its masking rules) and features round-trip."""
import dataclasses

from chips_core.platform.features import load_bank, save_bank
from chips_core.platform.warehouse import Warehouse

from ..conftest import make_bank


def test_bank_round_trips_with_its_masking_rules_and_id(tmp_path, tiny_vit, pairs):
    wh = Warehouse(str(tmp_path / "wh"))
    plain = make_bank(tiny_vit, pairs, size=8)
    masked = dataclasses.replace(plain, mask_same_caption=True, mask_image_cosine=0.98)
    for run, bank in (("plain", plain), ("masked", masked)):
        save_bank(wh, bank, run)
        back = load_bank(wh, run)
        assert back.bank_id == bank.bank_id and back.masking == bank.masking
        assert back.pair_ids == bank.pair_ids and (back.h_t == bank.h_t).all()
    assert load_bank(wh, "plain").bank_id != load_bank(wh, "masked").bank_id
