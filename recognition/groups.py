"""The protected groups: their attribute codes and names, group names in one index order, the
`--selected-attributes` grammar and the selection of a rec's identities by group.

Codes (the FairFace challenge's, the architecture's contract): GENDER 0 female / 1 male, SKIN_COLOUR
0 light / 1 dark. Rec labels spell the attributes `gender` / `skin_colour` (the sidecar), csv files
`GENDER` / `SKIN_COLOUR`. The combined groups have one index order, `group_index` = skin_colour*2 + gender
(light_female, light_male, dark_female, dark_male): the evaluation's group indices, report.json's group
order and the chain table's columns. The seed's integer `--selected-attributes` is a different order, a
parsing rule only (`seed_index_codes`).
"""
import os

from recognition.utils import UserError, read_json

GENDER_NAMES = ('female', 'male')      # GENDER code -> name
SKIN_NAMES = ('light', 'dark')         # SKIN_COLOUR code -> name
GENDER, SKIN = 'gender', 'skin_colour'              # the rec labels' attribute names
GENDER_COLUMN, SKIN_COLUMN = 'GENDER', 'SKIN_COLOUR'  # the csv columns
# Other spellings of the attribute names `--selected-attributes` accepts (matched case-insensitively).
NAME_ALIASES = {'skin': SKIN, 'skin_color': SKIN, 'sex': GENDER}


def group_index(gender, skin):
    """The combined group's index in `GROUPS` (numbers or numpy arrays of codes)."""
    return skin * 2 + gender


GROUPS = tuple(f'{SKIN_NAMES[skin]}_{GENDER_NAMES[gender]}' for skin in (0, 1) for gender in (0, 1))
GENDER_SKIN = 'gender_skin'
# Each protected attribute of the evaluation -> its group names, index = the group's code (or group_index).
ATTRIBUTES = {'gender': GENDER_NAMES, 'skin': SKIN_NAMES, GENDER_SKIN: GROUPS}
# The csv codes of every group name, single attributes first.
GROUP_CODES = {**{name: {GENDER_COLUMN: code} for code, name in enumerate(GENDER_NAMES)},
               **{name: {SKIN_COLUMN: code} for code, name in enumerate(SKIN_NAMES)},
               **{GROUPS[group_index(gender, skin)]: {SKIN_COLUMN: skin, GENDER_COLUMN: gender}
                  for skin in (0, 1) for gender in (0, 1)}}
GROUP_FILE = 'protected_group.json'   # the step-3 choice of train/select_protected_group.py


def group_name(gender, skin):
    """The combined group of codes (`dark_female`), None for a code outside 0/1."""
    if gender not in (0, 1) or skin not in (0, 1):
        return None
    return GROUPS[group_index(gender, skin)]


def group_label(name):
    """The prose spelling of a group name (`dark female`), as the demo summaries print it."""
    return name.replace('_', ' ')


def seed_index_codes(index):
    """The FairFace seed's 4-way `--selected-attributes` integer, gender*2 + skin_colour on this project's
    codes (0 light_female, 1 dark_female, 2 light_male, 3 dark_male; the seed's unpublished rec encoded
    its attributes differently, where 3 was dark female) -> [(attribute, code)]."""
    gender, skin = divmod(index, 2)
    return [(GENDER, gender), (SKIN, skin)]


# --- parsing ------------------------------------------------------------------------------------------
def rec_attribute(name, attribute_names, where):
    """The rec's own spelling of attribute `name` (case-insensitive, with aliases)."""
    key = name.strip().lower()
    key = NAME_ALIASES.get(key, key)
    for have in attribute_names:
        if have.lower() == key:
            return have
    raise UserError(f'{where}: no attribute {name!r} in the rec labels (have {list(attribute_names)})')


def _code(rec_name, value, attribute_codes, where):
    """Integer code of `value` (a number or its meaning in the sidecar) for attribute `rec_name`."""
    value = str(value).strip()
    if value.lstrip('-').isdigit():
        return int(value)
    meanings = {m.lower(): c for c, m in attribute_codes.get(rec_name, {}).items()}
    if value.lower() not in meanings:
        raise UserError(f'{where}: {rec_name} has no value {value!r} (have {sorted(meanings)})')
    return meanings[value.lower()]


def parse_group(spec, attribute_names, attribute_codes, where='--selected-attributes'):
    """`--selected-attributes` -> {rec attribute name: code}.

    Accepted: a name of `GROUP_CODES` (`dark_female`, `female`, `dark`, ...; `dark female` and
    `dark-female` too); `attr=value[,attr=value]` with codes or sidecar meanings (`gender=0,skin_colour=1`,
    `gender=female,skin=dark`); or the seed's 4-way integer (`seed_index_codes`).
    """
    text = str(spec).strip()
    if not text:
        raise UserError(f'{where}: empty group')
    if text.isdigit():
        index = int(text)
        if index > 3:
            raise UserError(f'{where}: the 4-way index gender*2+skin_colour is 0..3, got {index}')
        pairs = seed_index_codes(index)
    elif '=' in text:
        pairs = []
        for part in text.split(','):
            name, sep, value = part.partition('=')
            if not sep or not name.strip() or not value.strip():
                raise UserError(f'{where}: expected attr=value[,attr=value], got {text!r}')
            pairs.append((name, value))
    else:
        key = text.lower().replace(' ', '_').replace('-', '_')
        if key not in GROUP_CODES:
            raise UserError(f'{where}: unknown group {text!r} (a name of {sorted(GROUP_CODES)}, '
                            f'attr=value pairs, or 0..3 = gender*2+skin_colour)')
        pairs = list(GROUP_CODES[key].items())
    out = {}
    for name, value in pairs:
        rec_name = rec_attribute(name, attribute_names, where)
        out[rec_name] = value if isinstance(value, int) else _code(rec_name, value, attribute_codes, where)
    return out


def describe_group(conditions, attribute_codes):
    """`gender=female(0), skin_colour=dark(1)` for log lines and reports."""
    parts = []
    for name, code in conditions.items():
        meaning = attribute_codes.get(name, {}).get(int(code))
        parts.append(f'{name}={meaning}({code})' if meaning else f'{name}={code}')
    return ', '.join(parts)


def read_group_choice(path):
    """The group name chosen by `select_protected_group` (its JSON `group` field)."""
    doc = read_json(path, 'no protected-group choice (run train/select_protected_group.py first)')
    if not isinstance(doc.get('group'), str):
        raise UserError(f'{path}: expected a JSON object with a "group" name')
    return doc['group']


def resolve_group_spec(spec, models_root='.'):
    """`auto` -> the group in `<models_root>/protected_group.json`; `auto:PATH` -> the one in PATH."""
    text = str(spec).strip()
    if text == 'auto' or text.startswith('auto:'):
        path = text[5:] or os.path.join(models_root, GROUP_FILE)
        return read_group_choice(path), path
    return text, None


# --- selection ----------------------------------------------------------------------------------------
def select_identities(dataset, spec, models_root='.', log=print):
    """Sorted identity ids of `dataset` in the protected group `spec` (see parse_group, resolve_group_spec).

    An empty group is an error: training on nothing must not silently become training on everything.
    """
    where = dataset.rec_paths[0]
    group, source = resolve_group_spec(spec, models_root)
    conditions = parse_group(group, dataset.attribute_names, dataset.attribute_codes,
                             where=f'--selected-attributes {group!r}' + (f' (from {source})' if source else ''))
    described = describe_group(conditions, dataset.attribute_codes)
    identities = dataset.identities_where(**conditions)
    if not identities:
        raise UserError(f'{where}: no identity of the protected group {group!r} ({described})')
    count = dataset.indices_of(identities).size
    log(f'--selected-attributes {spec}: group {group!r} ({described}): {len(identities)} of '
        f'{len(dataset.identities)} identities, {count} images' + (f' (choice read from {source})' if source else ''))
    return identities


def identity_groups(dataset):
    """{identity: combined group name, `unknown` for other codes}; None when the rec lacks gender or skin."""
    try:
        gender, skin = (rec_attribute(n, dataset.attribute_names, '') for n in (GENDER, SKIN))
    except UserError:
        return None
    gi, si = dataset.attribute_names.index(gender), dataset.attribute_names.index(skin)
    out = {}
    for identity in dataset.identities.tolist():
        attrs = dataset.identity_attributes(identity)
        out[identity] = group_name(int(attrs[gi]), int(attrs[si])) or 'unknown'
    return out


# --- groups of a protected attribute, per identity (the fair-training switches) --------------------------
# The rec attributes each protected attribute of ATTRIBUTES is read from.
ATTRIBUTE_COLUMNS = {'gender': (GENDER,), 'skin': (SKIN,), GENDER_SKIN: (GENDER, SKIN)}
_PROTECTED_ALIASES = {'skin_colour': 'skin', 'skin_color': 'skin', 'sex': 'gender', 'gender_x_skin': GENDER_SKIN,
                      'skin_gender': GENDER_SKIN, 'skin_x_gender': GENDER_SKIN}


def protected_attribute(name, where):
    """An `ATTRIBUTES` key from a user's spelling (`gender`, `skin`/`skin_colour`, `gender_skin`)."""
    key = str(name).strip().lower().replace(' ', '_').replace('-', '_')
    key = _PROTECTED_ALIASES.get(key, key)
    if key not in ATTRIBUTES:
        raise UserError(f'{where}: unknown protected attribute {name!r} (have {sorted(ATTRIBUTES)})')
    return key


def _group_of(attribute, codes):
    if attribute == GENDER_SKIN:
        return group_name(*codes)
    names = GENDER_NAMES if attribute == 'gender' else SKIN_NAMES
    return names[codes[0]] if codes[0] in (0, 1) else None


def identity_groups_of(dataset, attribute, where):
    """{identity: its group of `attribute` (an `ATTRIBUTES` key), None for a code outside the vocabulary}.

    A rec without the labels the attribute is made of is an error naming the labels it has.
    """
    columns = []
    for name in ATTRIBUTE_COLUMNS[attribute]:
        try:
            columns.append(dataset.attribute_names.index(rec_attribute(name, dataset.attribute_names, where)))
        except UserError:
            raise UserError(f'{where}: {dataset.rec_paths[0]} has no {name!r} label, which {attribute} groups need '
                            f'(its labels: {list(dataset.attribute_names) or "none"})') from None
    out = {}
    for identity in dataset.identities.tolist():
        attrs = dataset.identity_attributes(identity)
        codes = [int(attrs[c]) if float(attrs[c]).is_integer() else -1 for c in columns]
        out[identity] = _group_of(attribute, codes)
    return out


def group_members(dataset, attribute, where, identities=None):
    """{group name: sorted identities} for every group of `attribute` (empty lists included), over
    `identities` (default all), and the number of identities whose codes fall outside the groups."""
    of = identity_groups_of(dataset, attribute, where)
    members = {name: [] for name in ATTRIBUTES[attribute]}
    outside = 0
    for identity in (sorted(int(i) for i in identities) if identities is not None else sorted(of)):
        group = of.get(identity)
        if group is None:
            outside += 1
        else:
            members[group].append(identity)
    return members, outside


def parse_group_values(spec, where):
    """`GROUP=VALUE[,GROUP=VALUE...]` (group names of one protected attribute) -> (attribute, {group: float})."""
    values = {}
    for part in str(spec).split(','):
        name, sep, value = part.partition('=')
        key = name.strip().lower().replace(' ', '_').replace('-', '_')
        if not sep or not key or not value.strip():
            raise UserError(f'{where}: expected GROUP=VALUE[,GROUP=VALUE...], got {spec!r}')
        if key not in GROUP_CODES:
            raise UserError(f'{where}: unknown group {name.strip()!r} (groups: '
                            + '; '.join(f'{a}: {", ".join(g)}' for a, g in ATTRIBUTES.items()) + ')')
        try:
            values[key] = float(value)
        except ValueError:
            raise UserError(f'{where}: {name.strip()}={value.strip()!r} is not a number') from None
    attributes = [a for a, names in ATTRIBUTES.items() if set(values) <= set(names)]
    if not attributes:
        raise UserError(f'{where}: {sorted(values)} mix protected attributes; name groups of one of '
                        + '; '.join(f'{a} ({", ".join(g)})' for a, g in ATTRIBUTES.items()))
    return attributes[0], values
