"Packaging for ddpo_course. Metadata comes from settings.ini (nbdev 2 layout)."
from configparser import ConfigParser
from setuptools import setup, find_packages

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

requirements = [
    'torch>=2.1',
    'torchvision>=0.16',          # open_clip imports it; install the standard PyPI wheel (not a CPU-only build)
    'diffusers>=0.30',            # StableDiffusionPipeline.encode_prompt, DDIMScheduler, load_lora_weights
    'transformers>=4.44',
    'open_clip_torch>=2.24',
    'accelerate>=0.34',
    'peft>=0.12',
    'safetensors>=0.4',
    'pyyaml>=6',
    'numpy>=1.24',
    'pillow>=10',
    'matplotlib>=3.7',
    'ipywidgets>=8',
    'fastprogress>=1.0.3,<1.1',   # fastprogress 1.1 requires fastcore 2, which breaks nbdev 2
    'fastcore>=1.5.29,<2',        # nbdev 2 does not run on fastcore 2
]
dev_requirements = [
    'nbdev>=2.3.31,<2.5',         # nbdev 3 refuses repositories with settings.ini
    'execnb>=0.1.6,<0.2',         # execnb 0.2 needs fastcore 2
    'ghapi<2',                    # ghapi 2 needs fastcore 2
    'pytest>=7',
    'pytest-xdist>=3.5',          # the README's test command runs the suite on two workers
    'tensorboard>=2.14',
    # the offline docs site (tools/build_docs.py) and its browser checks (tests/test_docs.py)
    'mkdocs-material>=9.5',
    'mkdocs-jupyter>=0.25',       # renders the committed notebooks with nbconvert, without executing them
    'latex2mathml>=3.77',         # formulas as MathML at build time: nothing fetched by the pages
    'selenium>=4.20',             # drives Debian's chromium + chromium-driver
    'jupyterlab>=4.2',            # tests/test_jupyterlab.py runs a lesson's explorer in a real JupyterLab
]

setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    author=cfg['author'],
    author_email=cfg['author_email'],
    url=cfg['git_url'],
    license='Apache-2.0',
    packages=find_packages(include=['ddpo_course', 'ddpo_course.*']),
    include_package_data=True,
    package_data={'ddpo_course': ['data/*.txt', 'presets/*.yaml', 'toy/SHA256SUMS', 'toy/*.safetensors', 'toy/pipeline/*.json', 'toy/pipeline/*/*', 'toy/early/*.txt', 'toy/early/*/*', 'toy/scenes/*.json', 'toy/scenes/*/*']},
    python_requires='>=' + cfg['min_python'],
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'pickapic': ['datasets>=2.14']},   # pickapic: the Pick-a-Pic prompt set (sd21_pickscore)
    entry_points={
        'console_scripts': [
            'ddpo-train=ddpo_course.train:main',
            'ddpo-bench=ddpo_course.bench:main',
            'ddpo-bench-gpu=ddpo_course.bench_gpu:main',
        ],
        'nbdev': ['ddpo_course=ddpo_course._modidx:d'],
    },
    zip_safe=False,
)
