"""The protected-group vocabulary: one index order, the codes behind every name, the seed's integer."""
import pytest

from recognition import groups
from recognition.data.record import KNOWN_CODES
from recognition.utils import UserError

REC_NAMES = ['gender', 'skin_colour', 'age']


def test_one_index_order_and_the_codes_behind_every_name():
    assert groups.GROUPS == ('light_female', 'light_male', 'dark_female', 'dark_male')
    assert groups.ATTRIBUTES['gender_skin'] == groups.GROUPS
    for index, name in enumerate(groups.GROUPS):
        codes = groups.GROUP_CODES[name]
        assert groups.group_index(codes['GENDER'], codes['SKIN_COLOUR']) == index
        assert groups.group_name(codes['GENDER'], codes['SKIN_COLOUR']) == name
        assert KNOWN_CODES['gender'][codes['GENDER']] in name and KNOWN_CODES['skin_colour'][codes['SKIN_COLOUR']] in name
    assert groups.group_name(2, 0) is None
    assert groups.group_label('dark_female') == 'dark female'


def test_the_seed_integer_is_gender_times_2_plus_skin():
    chosen = [groups.parse_group(str(i), REC_NAMES, KNOWN_CODES) for i in range(4)]
    assert [groups.group_name(c['gender'], c['skin_colour']) for c in chosen] == \
        ['light_female', 'dark_female', 'light_male', 'dark_male']
    assert groups.parse_group('Dark-Female', REC_NAMES, KNOWN_CODES) == {'skin_colour': 1, 'gender': 0}
    assert groups.parse_group('sex=male', REC_NAMES, KNOWN_CODES) == {'gender': 1}
    with pytest.raises(UserError, match='0..3'):
        groups.parse_group('4', REC_NAMES, KNOWN_CODES)
